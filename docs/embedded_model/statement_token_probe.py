"""Probe: the variable-binding task with one token per statement and one hop supervised per step.

This is the experiment that found a training set-up in which a small looped model learns to follow
links within the CPU budget (see ``docs/embedded_model.md``); the shipped models do not use it
yet. Standalone: it builds its own vocabulary (``<pad> <bos> ?``, 26 variables + 10 digits as
answers, 26 x 36 statement tokens ``lhs=rhs;``) on top of ``tl_loop.tasks.varbind`` problems, and
trains a ``HookedLoopedTransformer`` (1 prelude + 1 recurrent + 1 coda layer, d_model 64, additive
injection, zero initial state, norm between steps) with the logits read out after every step
(``tl_loop.readout.read_out``) supervised on the chain element reached after that many links.

    python docs/embedded_model/statement_token_probe.py W '{"its": 6000}'

prints, every 100 iterations, held-out accuracy ``{n_steps: {hops: accuracy}}``.
"""
import sys, random, time, json, torch, torch.nn.functional as F
torch.set_num_threads(1)
from tl_loop import HookedLoopedTransformer, LoopedConfig
from tl_loop.readout import read_out
from tl_loop.tasks.varbind import VarBindTask, VARIABLES, DIGITS
tag, over = sys.argv[1], json.loads(sys.argv[2])
task = VarBindTask(**over.get("task", dict(n_statements=8, max_chain=4)))
Q = over.get("queries", 4); hops = over.get("hops", [1,2,3,4]); S = over.get("steps", 8)
RHS = VARIABLES + DIGITS
BOS, QM = 1, 2
def var_id(v): return 3 + VARIABLES.index(v)
def ans_id(a): return 3 + RHS.index(a)
def st_id(l, r): return 3 + len(RHS) + VARIABLES.index(l) * len(RHS) + RHS.index(r)
V = 3 + len(RHS) + 26 * len(RHS)
def path(p, q):
    d = dict(p.statements); out = []
    while q in d:
        q = d[q]; out.append(q)
    return out
def encode(ps, rng, Q):
    rows, answers, paths = [], [], []
    for p in ps:
        row = [BOS] + [st_id(a, b) for a, b in p.statements] + [QM, var_id(p.query)]
        qs = [p.query] + [v for v, _ in task._extra_queries(p, rng, Q - 1, hops)]
        for v in qs[1:]: row += [QM, var_id(v)]
        rows.append(row)
        pa = [path(p, v) for v in qs]
        answers.append([ans_id(x[-1]) for x in pa])
        paths.append([[ans_id(x[min(r, len(x)) - 1]) for r in range(1, S + 1)] for x in pa])  # [Q, S]
    n = len(ps[0].statements) + 1
    return torch.tensor(rows), torch.tensor([n + 1 + 2*q for q in range(Q)]), torch.tensor(answers), torch.tensor(paths)
mc = dict(d_model=64, d_head=16, n_heads=4, d_mlp=128, d_vocab=V, n_ctx=64, normalization_type="RMS",
        n_prelude_layers=1, n_core_layers=1, n_coda_layers=1, n_steps=S, injection="add", state_init="zeros", norm_between_steps=True, loop_norm_weights="own")
mc.update(over.get("model", {}))
m = HookedLoopedTransformer(LoopedConfig(**mc), seed=0); m.train()
opt = torch.optim.AdamW(m.parameters(), lr=over.get("lr", 3e-3), weight_decay=0.1, betas=(0.9,0.98))
rng = random.Random(0); t=time.time()
evs = {}
for h in (1,2,3,4,6):
    ps = task.dataset(h, 256, "test"); tok, _, ans, _ = encode(ps, random.Random(0), 1)
    evs[h] = (tok, ans[:, 0])
names = [f"loops.{r}.hook_state_out" for r in range(S)]
for it in range(1, over.get("its", 3000)+1):
    ps = task.batch(rng, over.get("bs", 32), hops, "train")
    tok, pos, ans, pa = encode(ps, rng, Q)
    states = []
    m.run_with_hooks(tok, fwd_hooks=[(n, lambda x, hook: states.append(x)) for n in names], return_type=None)
    lg = read_out(m, torch.stack(states))  # [S, batch, pos, vocab]
    lg = lg[:, :, pos]  # [S, batch, Q, vocab]
    loss = F.cross_entropy(lg.flatten(0, 2), pa.permute(2, 0, 1).flatten())
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    if it % 100 == 0:
        with torch.no_grad():
            res = {s: {h: round((m(e[0], n_steps=s)[:, -1].argmax(-1) == e[1]).float().mean().item(), 2) for h, e in evs.items()} for s in (1, 2, 4, 8, 16)}
        print(tag, it, round(loss.item(),3), res, round(time.time()-t), flush=True)
