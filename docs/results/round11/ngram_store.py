"""Round 11 (checked and dropped, docs/training.md): how well does an n-gram store of the target's own greedy answers predict its answers to new prompts?"""
import gzip, json, sys, time
import numpy as np
from koala.target import load_target

t0 = time.time()
tok = load_target().tokenizer
def turns(path):
    for line in gzip.open(path, "rt"):
        r = json.loads(line)
        c = r["conversations"]
        for i, m in enumerate(c):
            if m["from"] == "gpt":
                yield c[i - 1]["value"] if i else "", m["value"]
store_files = ["data/smollm2-135m/sharegpt-first-turns.jsonl.gz", "data/smollm2-135m/sharegpt-later-turns.jsonl.gz",
               "data/smollm2-135m/task-answers.jsonl.gz"]
seqs = [tok.encode(a, add_special_tokens=False) + [-1] for f in store_files for _, a in turns(f)]
flat = np.array([t for s in seqs for t in s], dtype=np.int64)
print("store tokens", len(flat), time.time() - t0, flush=True)
N = 6
tables = {}
for n in range(1, N + 1):
    # key = n previous tokens packed 16 bits each (n <= 4 exact; n > 4 hashed)
    idx = np.arange(n, len(flat))
    ctx = np.stack([flat[idx - n + j] for j in range(n)], 1)
    ok = (ctx >= 0).all(1) & (flat[idx] >= 0)
    ctx, nxt = ctx[ok], flat[idx][ok]
    key = np.zeros(len(ctx), dtype=np.uint64)
    for j in range(n):
        key = key * np.uint64(1000003) + ctx[:, j].astype(np.uint64)
    pair = np.stack([key.view(np.int64), nxt], 1)
    u, cnt = np.unique(pair, axis=0, return_counts=True)
    # per key: best next and total
    keys, start = np.unique(u[:, 0], return_index=True)
    tot = np.add.reduceat(cnt, start)
    best = np.maximum.reduceat(cnt, start)
    # best next: the row within each group with max count
    order = np.lexsort((-cnt, u[:, 0]))
    u2, c2 = u[order], cnt[order]
    k2, s2 = np.unique(u2[:, 0], return_index=True)
    tables[n] = dict(zip(k2.tolist(), zip(u2[s2, 1].tolist(), (c2[s2] / np.add.reduceat(c2, s2)).tolist(), np.add.reduceat(c2, s2).tolist())))
    print("order", n, len(tables[n]), time.time() - t0, flush=True)

def hkey(ctx):
    k = 0
    for t in ctx:
        k = (k * 1000003 + t) % (1 << 64)
    return np.uint64(k).view(np.int64).item() if False else np.array([k], dtype=np.uint64).view(np.int64)[0].item()

def predict(hist, min_n=1, min_count=1):
    for n in range(min(N, len(hist)), min_n - 1, -1):
        e = tables[n].get(hkey(hist[-n:]))
        if e and e[2] >= min_count:
            return e[0], e[1], n, e[2]
    return None

def pld(hist, prompt_len, max_n=3, min_n=3, L=8):
    for n in range(max_n, min_n - 1, -1):
        pat = hist[-n:]
        for s in range(len(hist) - n - 1, -1, -1):
            if hist[s:s + n] == pat:
                return hist[s + n:s + n + L]
    return []

evals = list(turns("data/smollm2-135m/specbench-answers.jsonl.gz"))
rows = []
for q, a in evals:
    p = tok.encode(q, add_special_tokens=False); y = tok.encode(a, add_special_tokens=False)
    hist = p[:]
    for i in range(len(y)):
        pr = predict(hist)
        # chain: follow the store greedily for up to 8 tokens
        h2, chain = hist[:], []
        for _ in range(8):
            e = predict(h2)
            if e is None: break
            chain.append(e); h2.append(e[0])
        acc = 0
        for j, e in enumerate(chain):
            if i + j < len(y) and e[0] == y[i + j]: acc += 1
            else: break
        pl = pld(hist, len(p))
        pacc = 0
        for j, t in enumerate(pl):
            if i + j < len(y) and t == y[i + j]: pacc += 1
            else: break
        rows.append((pr is not None, pr is not None and pr[0] == y[i], pr[1] if pr else 0, pr[2] if pr else 0, acc,
                     [c[1] for c in chain], len(pl) > 0, pacc))
        hist.append(y[i])
print("eval positions", len(rows), time.time() - t0)
hit = np.array([r[1] for r in rows]); conf = np.array([r[2] for r in rows]); order = np.array([r[3] for r in rows])
print("top-1 acc (any order):", hit.mean())
for lo, hi in [(0, .2), (.2, .4), (.4, .6), (.6, .8), (.8, .95), (.95, 1.01)]:
    m = (conf >= lo) & (conf < hi)
    print(f"  conf [{lo},{hi}): n={m.sum()} acc={hit[m].mean():.3f}")
for n in range(1, N + 1):
    m = order == n
    print(f"  order {n}: n={m.sum()} acc={hit[m].mean() if m.any() else 0:.3f}")
acc = np.array([r[4] for r in rows])
print("chain-8 mean accepted (every position):", acc.mean())
pm = np.array([r[6] for r in rows]); pa = np.array([r[7] for r in rows])
print("pld fires", pm.mean(), "mean accepted when fires", pa[pm].mean(), "overall", pa.mean())
json.dump([(bool(r[1]), r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in rows], open("runs/ngram-rows.json", "w"))
