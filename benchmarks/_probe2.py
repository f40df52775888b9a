import torch, torch._dynamo
from grpo.models.fp8 import Fp8LinearFunction
import grpo.models.fp8 as f
shapes=[(1024,1536),(512,1536),(1024,576),(512,2048),(1024,1024),(1024,2816),(2816,1024),(512,1024),(1024,512)]
torch.manual_seed(0)
for disable in (False, True):
    torch._dynamo.config.disable = disable
    out=[]
    for K,N in shapes:
        x=torch.randn(48,K,device="cuda",dtype=torch.bfloat16); w=torch.randn(N,K,device="cuda",dtype=torch.bfloat16)*0.02
        ref=x.float()@w.float().t(); y=Fp8LinearFunction.apply(x,w,False).float()
        x3=torch.randn(2,24,K,device="cuda",dtype=torch.bfloat16)
        out.append(f"{K}->{N}:{((y-ref).norm()/ref.norm()).item():.3f}")
    print("compile disabled" if disable else "compile on", " ".join(out), flush=True)
