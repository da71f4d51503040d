"""Ad hoc A/B (not a pytest-benchmark case): torch.nn.GRU and ours, inference, one thread, best of
5 loops, for a few shapes. Run it twice, once with RNNREC_FAST_NO_AVX512=1, to compare our AVX-512
and AVX2 kernels on one machine (results: benchmarks/results/adhoc-avx512-vs-avx2-*.md)."""
import torch, rnnrec_fast, time, sys
torch.set_num_threads(1)
torch.manual_seed(0)
for (B,T,H) in [(64,1,512),(256,1,100),(1,1,100),(64,20,512),(1,20,512)]:
    m = rnnrec_fast.GRU(H, H, batch_first=True); ref = torch.nn.GRU(H, H, batch_first=True); ref.load_state_dict(m.state_dict())
    x = torch.randn(B, T, H)
    res = []
    for mod in (ref, m):
        with torch.inference_mode():
            for _ in range(5): mod(x)
            n = max(3, int(2e5 // (B*T*H)))
            best = 1e9
            for r in range(5):
                t0 = time.perf_counter()
                for _ in range(n): mod(x)
                best = min(best, (time.perf_counter()-t0)/n)
        res.append(best*1e6)
    print(B,T,H, "torch %.1f ours %.1f ratio %.2f" % (res[0], res[1], res[0]/res[1]))
