# bwd_seq.cu's control flow in numpy (tiles as whole matrices, fp64): the step order
# (n, head, m >= n), the key-tile switch, masking, lse2 = +inf padding, and dQ partials kept in
# a scratch array and finished on the diagonal step; compared with a direct backward.
import numpy as np
rng = np.random.default_rng(1)
T = 64
def run(L, G, DH):
    nq = -(-L // T); P_ = nq * T
    q = rng.standard_normal((G, P_, DH)); k = rng.standard_normal((P_, DH)); v = rng.standard_normal((P_, DH))
    do = rng.standard_normal((G, P_, DH)); scale = DH ** -0.5
    for a in (q, do): a[:, L:] = 0
    k[L:] = 0; v[L:] = 0
    mask = np.tril(np.ones((L, L), bool))
    # reference
    dq_ref = np.zeros((G, L, DH)); dk_ref = np.zeros((L, DH)); dv_ref = np.zeros((L, DH)); lse = np.zeros((G, P_)); D = np.zeros((G, P_))
    for h in range(G):
        s = q[h, :L] @ k[:L].T * scale; s[~mask] = -np.inf
        mx = s.max(1, keepdims=True); p = np.exp(s - mx); l = p.sum(1, keepdims=True); p /= l
        o = p @ v[:L]; lse[h, :L] = (mx + np.log(l))[:, 0]; lse[h, L:] = np.inf
        D[h, :L] = (do[h, :L] * o).sum(1)
        dp = do[h, :L] @ v[:L].T; ds = p * (dp - D[h, :L, None])
        dq_ref[h] = ds @ k[:L] * scale; dk_ref += ds.T @ q[h, :L] * scale; dv_ref += p.T @ do[h, :L]
    # kernel flow
    dq = np.full((G, P_, DH), np.nan); dk = np.full((P_, DH), np.nan); dv = np.full((P_, DH), np.nan)
    acc = np.full((G, P_, DH), np.nan)
    n = gi = m = 0; steps = G * nq * (nq + 1) // 2
    dka = np.zeros((T, DH)); dva = np.zeros((T, DH))
    for st in range(steps):
        if st > 0 and gi == 0 and m == n:
            dk[(n-1)*T:n*T] = dka * scale; dv[(n-1)*T:n*T] = dva; dka[:] = 0; dva[:] = 0
        Q = q[gi, m*T:(m+1)*T]; O = do[gi, m*T:(m+1)*T]; K = k[n*T:(n+1)*T]; V = v[n*T:(n+1)*T]
        s = Q @ K.T * scale
        p = np.exp(s - lse[gi, m*T:(m+1)*T, None])
        if m == n: p[np.triu(np.ones((T, T), bool), 1)] = 0
        ds = p * (O @ V.T - D[gi, m*T:(m+1)*T, None])
        dva += p.T @ O; dka += ds.T @ Q
        part = ds @ K
        if n > 0: part = part + acc[gi, m*T:(m+1)*T]
        if m == n: dq[gi, m*T:(m+1)*T] = part * scale
        else: acc[gi, m*T:(m+1)*T] = part
        m += 1
        if m == nq:
            gi += 1
            if gi == G: gi = 0; n += 1
            m = n
    dk[(nq-1)*T:nq*T] = dka * scale; dv[(nq-1)*T:nq*T] = dva
    for name, a, b in (("dq", dq[:, :L], dq_ref), ("dk", dk[:L], dk_ref), ("dv", dv[:L], dv_ref)):
        err = np.abs(a - b).max(); assert err < 1e-9, (L, G, name, err)
for L in (65, 100, 127, 128, 129, 200, 256, 257, 400, 511):
    for G in (1, 4):
        run(L, G, 64)
print("flow ok")
