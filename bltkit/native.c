/* The generator's step functions for a CPU and fp32, in C (bltkit/native.py builds and loads this
 * file). Each function does what the same-named step of bltkit.generate.Generator does, on the
 * same state tensors (their addresses are handed over once, by blt_new), one row after another
 * and one operation after another without PyTorch's per-operator overhead, which is nearly all
 * of a small model's step on a CPU. Layouts are the generator's:
 *   ring caches k, v [L, B, Nkv, S, H], ring pos [S] (shared by the rows), ring doc [B, S] int32;
 *   the global cache [L, B, Nkv, p_cap + 1, H] with g_doc [B, p_cap + 1];
 *   the encoder's cross keys/values [n_cross, B, Nkv, capacity, H] and the decoder's
 *   [n_cross, B, Nkv, K, H]; matrices as transposed copies [in, out] (native.py makes them),
 *   norms and embedding tables as the model holds them.
 * Products accumulate in fp32, as the BLAS does; sums run in another order than the BLAS, so
 * results agree with PyTorch's to rounding (tests/test_native.py states the tolerance). Sampling
 * is bltkit/sampling.py's, with the same noise. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NATIVE_VERSION 1

typedef struct {
    const float *an, *wq, *wk, *wv, *wo, *fn, *w1, *w3, *w2;
} Block;

typedef struct {
    int D, N, Nkv, H, F, L;
    float eps;
    Block *blk;
    float *k, *v;       /* caches [L, B, Nkv, S, H] */
    int64_t S;          /* slots a row */
    int64_t *pos;       /* ring: position in each slot (-1 empty); NULL for the global cache */
    int32_t *rdoc;      /* ring: document of each slot [B, S] */
    int64_t window;     /* ring: attention window (<= 0: none) */
    const float *cos, *sin; /* RoPE [T, H/2] */
} Stack;

typedef struct {
    const float *nq, *nkv, *wq, *wk, *wv, *wo;
    int N, Nkv, H;
    float eps;
} Cross;

typedef struct Model Model;

struct Model {
    int B, V, K, cap, p_cap, bufw, W;
    int64_t bos, eos, offset;
    /* entropy model */
    int has_ent;
    Stack ent;
    const float *ent_emb, *ent_norm, *ent_out;
    float ent_eps;
    int ent_V;
    /* encoder */
    Stack enc;
    const float *tok_emb, *hash_emb;
    int n_tables;
    const int64_t *coef; /* [n_tables, W + 1] */
    int64_t hash_vocab;
    int n_enc_cross;
    Cross *ecross;
    int *enc_cross_at; /* cross layer of each encoder layer, -1 none */
    const float *enc_proj; /* [K * De, De] */
    float *enc_xk, *enc_xv, *runmax;
    /* global */
    Stack glob;
    const float *g_proj; /* [Dg, K * De] or NULL */
    int64_t *g_doc;
    /* decoder */
    int n_dec_cross;
    Cross *dcross;
    int *dec_cross_at;
    const float *dec_proj; /* [K * Dd, Dg] */
    float *dec_xk, *dec_xv;
    Stack dec;
    const float *dec_norm, *dec_out;
    float dec_eps;
    /* state */
    int64_t *n, *hist, *doc, *open_len, *open_start, *p, *pdoc, *x, *buf, *lens, *next, *keys;
    float *h_prev, *h, *logits, *Hent;
    uint8_t *like_prev, *open_eos, *close, *any_close;
    /* patcher: mode 0 entropy, 1 space, 2 static, 3 byte */
    int mode, mono, has_add, doc_bound;
    float thr, thr_add;
    int64_t patch_size, max_len;
    /* scratch */
    int dmax, smax;
    float *sx, *sxn, *sq, *sk, *sv, *sa, *sf1, *sf3, *sscore, *su, *su2;
    uint8_t *svalid;
    int64_t *srow, *spos;
    float *smv; /* matvec's sums [B, dmax] */
    float *sl;  /* sampling: a row's filtered logits and probabilities [2, V] */
    int *sidx;  /* sampling: their order and the sort's buffer [2, V] */
};

/* -- arithmetic ------------------------------------------------------------------------------ */

static float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[r] = W x[r], or beta y[r] + W x[r] (`add`), for R rows (x, y strided by xs, ys), from the
 * weight's transposed copy WT [in, out]: every input scales a contiguous row of WT into the
 * outputs, which the compiler vectorises across outputs (no horizontal sums); each row of WT is
 * read once for all R rows */
static void matvec(Model *m, const float *WT, int out, int in, const float *x, int xs, float *y, int ys, int R,
                   int add, float beta) {
    float *acc = add ? m->smv : y;
    int as = add ? out : ys;
    for (int r = 0; r < R; r++) memset(acc + (int64_t)r * as, 0, out * sizeof(float));
    for (int i = 0; i < in; i++) {
        const float *w = WT + (int64_t)i * out;
        for (int r = 0; r < R; r++) {
            float xi = x[(int64_t)r * xs + i], *a = acc + (int64_t)r * as;
#pragma omp simd
            for (int o = 0; o < out; o++) a[o] += xi * w[o];
        }
    }
    if (add)
        for (int r = 0; r < R; r++) {
            float *t = y + (int64_t)r * ys, *a = acc + (int64_t)r * as;
            for (int o = 0; o < out; o++) t[o] = beta * t[o] + a[o];
        }
}

static void rmsnorm(const float *x, const float *w, int D, float eps, float *out) {
    float ss = dot(x, x, D);
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = 0; i < D; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *v, int heads, int H, const float *c, const float *s) {
    for (int h = 0; h < heads; h++) {
        float *u = v + h * H;
        for (int i = 0; i < H / 2; i++) {
            float a = u[2 * i], b = u[2 * i + 1];
            u[2 * i] = a * c[i] - b * s[i];
            u[2 * i + 1] = b * c[i] + a * s[i];
        }
    }
}

/* one query head over keys k[j], values v[j] (rows of H) for j in [lo, hi) where valid[j] (NULL:
 * all), softmax(q.k / sqrt(H)) */
static void attend(const float *q, const float *k, const float *v, int H, int64_t lo, int64_t hi,
                   const uint8_t *valid, float *score, float *out) {
    float scale = 1.0f / sqrtf((float)H), mx = -INFINITY;
    for (int64_t j = lo; j < hi; j++) {
        if (valid && !valid[j]) continue;
        float s = dot(q, k + j * H, H) * scale;
        score[j - lo] = s;
        if (s > mx) mx = s;
    }
    float sum = 0.0f;
    for (int i = 0; i < H; i++) out[i] = 0.0f;
    for (int64_t j = lo; j < hi; j++) {
        if (valid && !valid[j]) continue;
        float e = expf(score[j - lo] - mx);
        sum += e;
        const float *vj = v + j * H;
        for (int i = 0; i < H; i++) out[i] += e * vj[i];
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < H; i++) out[i] *= inv;
}

/* -- blocks ---------------------------------------------------------------------------------- */

/* R rows (cache rows row[r]) through a stack's blocks at RoPE positions pos[r], each writing its
 * keys and values at slot[r] and attending the slots j < nkeys[r] with valid[r * S + j] */
static void stack_step(Model *m, Stack *st, float *x, int R, const int64_t *row, const int64_t *pos,
                       const int64_t *slot, const int64_t *nkeys, const uint8_t *valid) {
    int D = st->D, N = st->N, Nk = st->Nkv, H = st->H, F = st->F, dm = m->dmax;
    int64_t S = st->S;
    int per = N / Nk;
    for (int l = 0; l < st->L; l++) {
        Block *b = &st->blk[l];
        for (int r = 0; r < R; r++) rmsnorm(x + r * dm, b->an, D, st->eps, m->sxn + r * dm);
        matvec(m, b->wq, N * H, D, m->sxn, dm, m->sq, dm, R, 0, 0.0f);
        matvec(m, b->wk, Nk * H, D, m->sxn, dm, m->sk, dm, R, 0, 0.0f);
        matvec(m, b->wv, Nk * H, D, m->sxn, dm, m->sv, dm, R, 0, 0.0f);
        for (int r = 0; r < R; r++) {
            const float *c = st->cos + pos[r] * (H / 2), *s = st->sin + pos[r] * (H / 2);
            rope(m->sq + r * dm, N, H, c, s);
            rope(m->sk + r * dm, Nk, H, c, s);
            for (int g = 0; g < Nk; g++) {
                int64_t at = (((int64_t)l * m->B + row[r]) * Nk + g) * S * H;
                memcpy(st->k + at + slot[r] * H, m->sk + r * dm + g * H, H * sizeof(float));
                memcpy(st->v + at + slot[r] * H, m->sv + r * dm + g * H, H * sizeof(float));
            }
            for (int h = 0; h < N; h++) {
                int64_t at = (((int64_t)l * m->B + row[r]) * Nk + h / per) * S * H;
                attend(m->sq + r * dm + h * H, st->k + at, st->v + at, H, 0, nkeys[r], valid + r * S, m->sscore,
                       m->sa + r * dm + h * H);
            }
        }
        matvec(m, b->wo, D, N * H, m->sa, dm, x, dm, R, 1, 1.0f);
        for (int r = 0; r < R; r++) rmsnorm(x + r * dm, b->fn, D, st->eps, m->sxn + r * dm);
        matvec(m, b->w1, F, D, m->sxn, dm, m->sf1, dm, R, 0, 0.0f);
        matvec(m, b->w3, F, D, m->sxn, dm, m->sf3, dm, R, 0, 0.0f);
        for (int r = 0; r < R; r++) {
            float *a = m->sf1 + r * dm, *c = m->sf3 + r * dm;
            for (int i = 0; i < F; i++) a[i] = a[i] / (1.0f + expf(-a[i])) * c[i];
        }
        matvec(m, b->w2, D, F, m->sf1, dm, x, dm, R, 1, 1.0f);
    }
}

/* claim position n's slot in a ring stack and lay out every row's step for stack_step: rows,
 * positions, slots and key counts (m->srow, m->spos: [0, B) and [B, 2B)), and the mask by
 * position, window and document (m->svalid) */
static void ring_claim(Model *m, Stack *st) {
    int B = m->B;
    int64_t n = *m->n, S = st->S, slot = n % S;
    st->pos[slot] = n;
    for (int b = 0; b < B; b++) {
        st->rdoc[b * S + slot] = (int32_t)m->doc[b];
        m->srow[b] = b;
        m->spos[b] = n;
        m->srow[B + b] = slot;
        m->spos[B + b] = S;
        for (int64_t j = 0; j < S; j++) {
            int64_t pj = st->pos[j];
            m->svalid[b * S + j] = pj >= 0 && pj <= n && (st->window <= 0 || n - pj < st->window) &&
                                   st->rdoc[b * S + j] == (int32_t)m->doc[b];
        }
    }
}

/* layer l of a ring stack for every row (after ring_claim) */
static void ring_layer(Model *m, Stack *st, int l, float *x) {
    Stack one = *st;
    int64_t per_layer = (int64_t)m->B * st->Nkv * st->S * st->H;
    one.L = 1;
    one.blk = st->blk + l;
    one.k = st->k + l * per_layer;
    one.v = st->v + l * per_layer;
    stack_step(m, &one, x, m->B, m->srow, m->spos, m->srow + m->B, m->spos + m->B, m->svalid);
}

/* 2 z + wo(attention of z's query over the keys j in [lo, hi) of cache row base) for one row */
static void cross_step(Model *m, Cross *c, float *z, int D, const float *kb, const float *vb, int64_t stride,
                       int64_t lo, int64_t hi) {
    int per = c->N / c->Nkv, dm = m->dmax;
    rmsnorm(z, c->nq, D, c->eps, m->sxn);
    matvec(m, c->wq, c->N * c->H, D, m->sxn, dm, m->sq, dm, 1, 0, 0.0f);
    for (int h = 0; h < c->N; h++) {
        int g = h / per;
        attend(m->sq + h * c->H, kb + g * stride * c->H, vb + g * stride * c->H, c->H, lo, hi, NULL, m->sscore,
               m->sa + h * c->H);
    }
    matvec(m, c->wo, D, c->N * c->H, m->sa, dm, z, dm, 1, 1, 2.0f);
}

/* the keys and values of `rows` inputs x (stride xs) for cross layer c, into k, v [Nkv, stride, H]
 * at slots at, at + 1, ... */
static void cross_kv(Model *m, Cross *c, const float *x, int xs, int rows, int D, float *k, float *v, int64_t stride,
                     int64_t at) {
    int dm = m->dmax;
    for (int r = 0; r < rows; r++) {
        rmsnorm(x + (int64_t)r * xs, c->nkv, D, c->eps, m->sxn);
        matvec(m, c->wk, c->Nkv * c->H, D, m->sxn, dm, m->sk, dm, 1, 0, 0.0f);
        matvec(m, c->wv, c->Nkv * c->H, D, m->sxn, dm, m->sv, dm, 1, 0, 0.0f);
        for (int g = 0; g < c->Nkv; g++) {
            memcpy(k + (g * stride + at + r) * c->H, m->sk + g * c->H, c->H * sizeof(float));
            memcpy(v + (g * stride + at + r) * c->H, m->sv + g * c->H, c->H * sizeof(float));
        }
    }
}

/* -- the step functions ---------------------------------------------------------------------- */

static int space_like(int64_t t, int64_t offset) {
    int64_t b = t - offset;
    return t < offset || b < 0x30 || (b >= 0x3A && b <= 0x40) || (b >= 0x5B && b <= 0x60) ||
           (b >= 0x7B && b <= 0x7F) || b >= 0xC0;
}

/* every step returns 0, or 1 without touching the state where position n lies outside the
 * state's capacity, or 2 where a row would pass the global cache's patches (the caller raises) */
#define GUARD(m) \
    if (*(m)->n < 0 || *(m)->n >= (m)->cap) return 1

int blt_front(Model *m) {
    GUARD(m);
    int B = m->B, dm = m->dmax;
    int64_t n = *m->n;
    /* the entropy of byte n + 1 */
    if (m->has_ent) {
        Stack *st = &m->ent;
        for (int b = 0; b < B; b++) memcpy(m->sx + b * dm, m->ent_emb + m->x[b] * st->D, st->D * sizeof(float));
        ring_claim(m, st);
        for (int l = 0; l < st->L; l++) ring_layer(m, st, l, m->sx);
        for (int b = 0; b < B; b++) {
            rmsnorm(m->sx + b * dm, m->ent_norm, st->D, m->ent_eps, m->sxn + b * dm);
        }
        matvec(m, m->ent_out, m->ent_V, st->D, m->sxn, dm, m->sf1, dm, B, 0, 0.0f);
        for (int b = 0; b < B; b++) {
            float *lg = m->sf1 + b * dm, mx = -INFINITY, s = 0.0f, H = 0.0f;
            for (int i = 0; i < m->ent_V; i++) mx = lg[i] > mx ? lg[i] : mx;
            for (int i = 0; i < m->ent_V; i++) s += expf(lg[i] - mx);
            float lse = mx + logf(s);
            for (int i = 0; i < m->ent_V; i++) {
                float lp = lg[i] - lse;
                H += expf(lp) * lp;
            }
            m->Hent[b] = -H;
        }
    }
    /* hash embedding and encoder */
    Stack *st = &m->enc;
    int De = st->D, Wd = m->W + 1;
    for (int b = 0; b < B; b++) {
        float *e = m->sx + b * dm;
        memcpy(e, m->tok_emb + m->x[b] * De, De * sizeof(float));
        if (m->n_tables) {
            float *bag = m->sa;
            for (int i = 0; i < De; i++) bag[i] = 0.0f;
            for (int t = 0; t < m->n_tables; t++) {
                uint64_t acc = 0;
                const int64_t *cf = m->coef + t * Wd;
                for (int j = 0; j < m->W; j++) acc += (uint64_t)m->hist[b * m->W + j] * (uint64_t)cf[j];
                acc += (uint64_t)m->x[b] * (uint64_t)cf[m->W];
                int64_t id = (int64_t)acc % m->hash_vocab;
                if (id < 0) id += m->hash_vocab;
                const float *row = m->hash_emb + (id + t * m->hash_vocab) * De;
                for (int i = 0; i < De; i++) bag[i] += row[i];
            }
            for (int i = 0; i < De; i++) e[i] += bag[i];
        }
    }
    /* the encoder's blocks one layer at a time, for its cross layers' keys and values */
    ring_claim(m, st);
    int pooled = 0;
    for (int l = 0; l < st->L; l++) {
        ring_layer(m, st, l, m->sx);
        int j = m->enc_cross_at[l];
        if (j < 0) continue;
        Cross *c = &m->ecross[j];
        int64_t per_row = (int64_t)c->Nkv * m->cap * c->H;
        for (int b = 0; b < B; b++) {
            int64_t at = ((int64_t)j * B + b) * per_row;
            cross_kv(m, c, m->sx + b * dm, dm, 1, De, m->enc_xk + at, m->enc_xv + at, m->cap, n);
            if (!pooled) {
                float *rm = m->runmax + b * De, *h = m->sx + b * dm;
                for (int i = 0; i < De; i++) rm[i] = h[i] > rm[i] ? h[i] : rm[i];
            }
        }
        pooled = 1;
    }
    for (int b = 0; b < B; b++) memcpy(m->h + b * De, m->sx + b * dm, De * sizeof(float));
    /* the boundary: does a patch close after byte n? */
    int any = 0;
    for (int b = 0; b < B; b++) {
        int64_t x = m->x[b];
        int close;
        if (m->mode == 0) {
            float H = m->Hent[b], d = H - m->h_prev[b];
            if (m->mono) close = n == 1 || (n >= 2 && d > m->thr);
            else if (m->has_add) close = n == 1 || (n >= 3 && H > m->thr && d > m->thr_add);
            else close = n >= 1 && H > m->thr;
        } else if (m->mode == 1) {
            int like = space_like(x, m->offset);
            close = n >= 1 && (x < m->offset || (like && !m->like_prev[b]));
            m->like_prev[b] = (uint8_t)like;
        } else if (m->mode == 2) {
            close = n % m->patch_size == 0;
        } else {
            close = 1;
        }
        close = close || n == 0;
        if (m->doc_bound) close = close || x == m->bos || x == m->eos;
        if (m->max_len > 0) close = close || m->open_len[b] + 1 >= m->max_len;
        if (m->has_ent) m->h_prev[b] = m->Hent[b];
        m->open_len[b] += 1;
        m->open_eos[b] = m->open_eos[b] || x == m->eos;
        if (m->W) {
            memmove(m->hist + b * m->W, m->hist + b * m->W + 1, (m->W - 1) * sizeof(int64_t));
            m->hist[b * m->W + m->W - 1] = x;
        }
        m->close[b] = (uint8_t)close;
        any |= close;
    }
    *m->any_close = (uint8_t)any;
    return 0;
}

/* the patch step of the rows whose patch closes after byte n: encoder cross-attention over the
 * open patch, one global step at the row's patch position, the decoder's cross keys/values; then
 * the patch counts */
int blt_patch(Model *m) {
    GUARD(m);
    int B = m->B, K = m->K, dm = m->dmax, De = m->enc.D, Dg = m->glob.D, Dd = m->dec.D;
    int64_t n = *m->n, S = m->glob.S;
    int R = 0;
    for (int b = 0; b < B; b++)
        if (m->close[b]) {
            if (m->p[b] < 0 || m->p[b] >= S) return 2; /* more patches than the global cache holds */
            m->srow[R++] = b;
        }
    if (!R) return 0;
    for (int r = 0; r < R; r++) {
        int64_t b = m->srow[r];
        float *u = m->su; /* the row's K units [K, De] */
        matvec(m, m->enc_proj, K * De, De, m->runmax + b * De, De, u, dm, 1, 0, 0.0f);
        for (int l = 0; l < m->enc.L; l++) {
            int j = m->enc_cross_at[l];
            if (j < 0) continue;
            Cross *c = &m->ecross[j];
            int64_t at = ((int64_t)j * B + b) * c->Nkv * m->cap * c->H;
            for (int k = 0; k < K; k++)
                cross_step(m, c, u + k * De, De, m->enc_xk + at, m->enc_xv + at, m->cap, m->open_start[b], n + 1);
        }
        float *x = m->sx + r * dm;
        if (m->g_proj) matvec(m, m->g_proj, Dg, K * De, u, dm, x, dm, 1, 0, 0.0f);
        else memcpy(x, u, Dg * sizeof(float));
        int64_t p = m->p[b];
        m->g_doc[b * S + p] = m->pdoc[b];
        m->spos[r] = p;
        m->spos[B + r] = p; /* slot */
        m->spos[2 * B + r] = p + 1 < S ? p + 1 : S; /* keys */
        for (int64_t j = 0; j < S; j++)
            m->svalid[r * S + j] = j <= p && j < m->p_cap && m->g_doc[b * S + j] == m->pdoc[b];
    }
    stack_step(m, &m->glob, m->sx, R, m->srow, m->spos, m->spos + B, m->spos + 2 * B, m->svalid);
    for (int r = 0; r < R; r++) {
        int64_t b = m->srow[r];
        float *du = m->su2; /* [K, Dd] */
        matvec(m, m->dec_proj, K * Dd, Dg, m->sx + r * dm, dm, du, dm, 1, 0, 0.0f);
        for (int j = 0; j < m->n_dec_cross; j++) {
            Cross *c = &m->dcross[j];
            int64_t at = ((int64_t)j * B + b) * c->Nkv * K * c->H;
            cross_kv(m, c, du, Dd, K, Dd, m->dec_xk + at, m->dec_xv + at, K, 0);
        }
        m->p[b] += 1;
        m->pdoc[b] += m->open_eos[b];
        m->open_eos[b] = 0;
        m->open_start[b] = n + 1;
        m->open_len[b] = 0;
        for (int i = 0; i < De; i++) m->runmax[b * De + i] = -INFINITY;
    }
    return 0;
}

/* -- sampling (bltkit/sampling.py's `sample`, step for step) -------------------------------------- */

static uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* indices of l [n] by value, largest first (a merge sort: ties keep index order) */
static void order_desc(const float *l, int *idx, int *tmp, int n) {
    for (int i = 0; i < n; i++) idx[i] = i;
    for (int w = 1; w < n; w *= 2)
        for (int lo = 0; lo < n; lo += 2 * w) {
            int mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n, a = lo, b = mid, k = lo;
            while (a < mid && b < hi) tmp[k++] = l[idx[b]] > l[idx[a]] ? idx[b++] : idx[a++];
            while (a < mid) tmp[k++] = idx[a++];
            while (b < hi) tmp[k++] = idx[b++];
            for (k = lo; k < hi; k++) idx[k] = tmp[k];
        }
}

/* softmax of l [n] (fp32, as PyTorch's) into p, through the order `idx` where given */
static void softmax(const float *l, const int *idx, int n, float *p) {
    float mx = -INFINITY, s = 0.0f;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, l[idx ? idx[i] : i]);
    for (int i = 0; i < n; i++) s += p[i] = expf(l[idx ? idx[i] : i] - mx);
    for (int i = 0; i < n; i++) p[i] /= s;
}

/* one row's next byte at temperature T > 0 with top-k (0: off) and top-p (outside (0, 1): off):
 * temperature, top-k, nucleus, then the exponential race argmax p_v / E_v, E_v from the
 * counter-based noise of (key, step, v) */
static int64_t sample_row(Model *m, const float *logits, int64_t key, int64_t step, float T, int64_t top_k,
                          double top_p) {
    int V = m->V, *idx = m->sidx, *tmp = m->sidx + V;
    float *l = m->sl, *p = m->sl + V;
    for (int v = 0; v < V; v++) l[v] = logits[v] / T;
    int use_k = top_k > 0 && top_k < V, use_p = top_p > 0.0 && top_p < 1.0;
    if (use_k || use_p) order_desc(l, idx, tmp, V);
    if (use_k) {
        float kth = l[idx[top_k - 1]];
        for (int v = 0; v < V; v++)
            if (l[v] < kth) l[v] = -INFINITY;
    }
    if (use_p) { /* drop the bytes whose preceding mass (largest first) exceeds top_p */
        softmax(l, idx, V, p);
        float cum = 0.0f, thr = (float)top_p;
        for (int i = 0; i < V; i++) {
            cum += p[i];
            if (cum - p[i] > thr) l[idx[i]] = -INFINITY;
        }
    }
    softmax(l, NULL, V, p);
    uint64_t base = splitmix64((uint64_t)key ^ ((uint64_t)step * 0xBF58476D1CE4E5B9ull));
    int64_t best = 0;
    double top = -1.0;
    for (int v = 0; v < V; v++) {
        uint64_t z = splitmix64(base + (uint64_t)v);
        double u = ((double)(z >> 11) + 1.0) / 9007199254740992.0; /* 2^53 */
        double race = (double)p[v] / -log(u);
        if (race > top) top = race, best = v;
    }
    return best;
}

/* the decoder for byte n: logits [B, V] and the next byte: at temperature <= 0 the first of the
 * largest logits, else sampled (`sample_row`) */
int blt_decode(Model *m, double temperature, int64_t top_k, double top_p) {
    GUARD(m);
    int B = m->B, dm = m->dmax, Dd = m->dec.D, K = m->K;
    for (int b = 0; b < B; b++) memcpy(m->su + b * dm, m->h + b * Dd, Dd * sizeof(float));
    /* the decoder's blocks one layer at a time, each after its cross layer */
    Stack *st = &m->dec;
    ring_claim(m, st);
    for (int l = 0; l < st->L; l++) {
        int j = m->dec_cross_at[l];
        if (j >= 0) {
            Cross *c = &m->dcross[j];
            for (int b = 0; b < B; b++) {
                int64_t at = ((int64_t)j * B + b) * c->Nkv * K * c->H;
                cross_step(m, c, m->su + b * dm, Dd, m->dec_xk + at, m->dec_xv + at, K, 0, K);
            }
        }
        ring_layer(m, st, l, m->su);
    }
    for (int b = 0; b < B; b++) rmsnorm(m->su + b * dm, m->dec_norm, Dd, m->dec_eps, m->sxn + b * dm);
    matvec(m, m->dec_out, m->V, Dd, m->sxn, dm, m->logits, m->V, B, 0, 0.0f);
    for (int b = 0; b < B; b++) {
        const float *lg = m->logits + b * m->V;
        int best = 0;
        if (temperature > 0.0) {
            best = (int)sample_row(m, lg, m->keys[b], *m->n, (float)temperature, top_k, top_p);
        } else {
            for (int i = 1; i < m->V; i++)
                if (lg[i] > lg[best]) best = i;
        }
        m->next[b] = best;
    }
    return 0;
}

int blt_advance(Model *m) {
    GUARD(m);
    for (int b = 0; b < m->B; b++) m->doc[b] += m->x[b] == m->eos;
    *m->n += 1;
    return 0;
}

int blt_feed(Model *m) {
    if (*m->n < 0 || *m->n >= m->bufw) return 1;
    int64_t n = *m->n;
    for (int b = 0; b < m->B; b++) {
        int64_t *at = m->buf + b * m->bufw + n;
        int64_t x = n < m->lens[b] ? *at : m->next[b];
        *at = x;
        m->x[b] = x;
    }
    return 0;
}

/* one byte whole: the last byte's decoder, advance and feed where they wait (`pending`),
 * then the front, and the patch step where some row closes a patch (Generator._step's order for
 * every row count: the patch step touches only the rows that close) */
int blt_byte(Model *m, int pending, double temperature, int64_t top_k, double top_p) {
    int code;
    if (pending && ((code = blt_decode(m, temperature, top_k, top_p)) || (code = blt_advance(m)) || (code = blt_feed(m)))) return code;
    if ((code = blt_front(m))) return code;
    return *m->any_close ? blt_patch(m) : 0;
}

int blt_flag(Model *m) {
    int any = 0;
    for (int b = 0; b < m->B; b++) any |= m->close[b];
    *m->any_close = (uint8_t)any;
    return any;
}

/* -- set-up ---------------------------------------------------------------------------------- */

typedef struct {
    const int64_t *ints;
    const double *reals;
    int64_t i, r;
} Reader;

static int64_t I(Reader *d) { return d->ints[d->i++]; }
static void *P(Reader *d) { return (void *)(intptr_t)d->ints[d->i++]; }
static float F(Reader *d) { return (float)d->reals[d->r++]; }

static int read_stack(Reader *d, Stack *st, int ring) {
    st->D = (int)I(d), st->N = (int)I(d), st->Nkv = (int)I(d), st->H = (int)I(d), st->F = (int)I(d);
    st->L = (int)I(d);
    st->eps = F(d);
    st->blk = calloc(st->L ? st->L : 1, sizeof(Block));
    if (!st->blk) return 0;
    for (int l = 0; l < st->L; l++) {
        Block *b = &st->blk[l];
        b->an = P(d), b->wq = P(d), b->wk = P(d), b->wv = P(d), b->wo = P(d);
        b->fn = P(d), b->w1 = P(d), b->w3 = P(d), b->w2 = P(d);
    }
    st->k = P(d), st->v = P(d), st->S = I(d);
    if (ring) st->pos = P(d), st->rdoc = P(d), st->window = I(d);
    st->cos = P(d), st->sin = P(d);
    return 1;
}

static Cross *read_cross(Reader *d, int count) {
    Cross *cs = calloc(count ? count : 1, sizeof(Cross));
    if (!cs) return NULL;
    for (int j = 0; j < count; j++) {
        Cross *c = &cs[j];
        c->N = (int)I(d), c->Nkv = (int)I(d), c->H = (int)I(d);
        c->eps = F(d);
        c->nq = P(d), c->nkv = P(d), c->wq = P(d), c->wk = P(d), c->wv = P(d), c->wo = P(d);
    }
    return cs;
}

static int *read_ints(Reader *d, int count) {
    int *out = calloc(count ? count : 1, sizeof(int));
    if (out)
        for (int i = 0; i < count; i++) out[i] = (int)I(d);
    return out;
}

static int imax(int a, int b) { return a > b ? a : b; }

void blt_free(Model *m) {
    if (!m) return;
    free(m->ent.blk), free(m->enc.blk), free(m->glob.blk), free(m->dec.blk);
    free(m->ecross), free(m->dcross), free(m->enc_cross_at), free(m->dec_cross_at);
    free(m->sx), free(m->sxn), free(m->sq), free(m->sk), free(m->sv), free(m->sa), free(m->sf1), free(m->sf3);
    free(m->sscore), free(m->su), free(m->su2), free(m->svalid), free(m->srow), free(m->spos), free(m->smv);
    free(m->sl), free(m->sidx);
    free(m);
}

/* the model and state from bltkit/native.py's description (its order); NULL if that is not the
 * order this file reads (a stale build) or memory runs out */
Model *blt_new(const int64_t *ints, const double *reals, int64_t n_ints) {
    Reader d = {ints, reals, 0, 0};
    Model *m = calloc(1, sizeof(Model));
    if (!m || I(&d) != NATIVE_VERSION) return blt_free(m), NULL;
    m->B = (int)I(&d), m->V = (int)I(&d), m->K = (int)I(&d), m->cap = (int)I(&d), m->p_cap = (int)I(&d);
    m->bufw = (int)I(&d), m->W = (int)I(&d);
    m->bos = I(&d), m->eos = I(&d), m->offset = I(&d);
    m->mode = (int)I(&d), m->mono = (int)I(&d), m->has_add = (int)I(&d), m->doc_bound = (int)I(&d);
    m->patch_size = I(&d), m->max_len = I(&d);
    m->thr = F(&d), m->thr_add = F(&d);
    m->has_ent = (int)I(&d);
    if (m->has_ent) {
        if (!read_stack(&d, &m->ent, 1)) return blt_free(m), NULL;
        m->ent_emb = P(&d), m->ent_norm = P(&d), m->ent_out = P(&d), m->ent_V = (int)I(&d);
        m->ent_eps = F(&d);
    }
    if (!read_stack(&d, &m->enc, 1)) return blt_free(m), NULL;
    m->tok_emb = P(&d), m->hash_emb = P(&d), m->n_tables = (int)I(&d), m->coef = P(&d), m->hash_vocab = I(&d);
    m->n_enc_cross = (int)I(&d);
    m->ecross = read_cross(&d, m->n_enc_cross);
    m->enc_cross_at = read_ints(&d, m->enc.L);
    m->enc_proj = P(&d), m->enc_xk = P(&d), m->enc_xv = P(&d), m->runmax = P(&d);
    if (!read_stack(&d, &m->glob, 0)) return blt_free(m), NULL;
    m->g_proj = P(&d), m->g_doc = P(&d);
    m->n_dec_cross = (int)I(&d);
    m->dcross = read_cross(&d, m->n_dec_cross);
    if (!read_stack(&d, &m->dec, 1)) return blt_free(m), NULL;
    m->dec_cross_at = read_ints(&d, m->dec.L);
    m->dec_proj = P(&d), m->dec_xk = P(&d), m->dec_xv = P(&d), m->dec_norm = P(&d), m->dec_out = P(&d);
    m->dec_eps = F(&d);
    m->n = P(&d), m->hist = P(&d), m->doc = P(&d), m->open_len = P(&d), m->open_start = P(&d);
    m->p = P(&d), m->pdoc = P(&d), m->x = P(&d), m->buf = P(&d), m->lens = P(&d), m->next = P(&d);
    m->h_prev = P(&d), m->h = P(&d), m->logits = P(&d), m->Hent = P(&d);
    m->like_prev = P(&d), m->open_eos = P(&d), m->close = P(&d), m->any_close = P(&d), m->keys = P(&d);
    if (I(&d) != NATIVE_VERSION || d.i != n_ints || !m->ecross || !m->dcross || !m->enc_cross_at ||
        !m->dec_cross_at)
        return blt_free(m), NULL;
    /* scratch: a row of every width a step uses, for every row */
    int K = m->K, dm = imax(m->V, imax(m->ent_V, m->K * imax(m->enc.D, m->dec.D)));
    Stack *all[4] = {&m->ent, &m->enc, &m->glob, &m->dec};
    int64_t smax = m->cap + 1;
    for (int s = 0; s < 4; s++) {
        Stack *st = all[s];
        dm = imax(dm, imax(st->D, imax(st->F, st->N * st->H)));
        smax = st->S > smax ? st->S : smax;
    }
    for (int j = 0; j < m->n_enc_cross; j++) dm = imax(dm, m->ecross[j].N * m->ecross[j].H);
    for (int j = 0; j < m->n_dec_cross; j++) dm = imax(dm, m->dcross[j].N * m->dcross[j].H);
    m->dmax = dm, m->smax = (int)smax;
    int64_t rows = (int64_t)m->B * dm;
    float **bufs[] = {&m->sx, &m->sxn, &m->sq, &m->sk, &m->sv, &m->sa, &m->sf1, &m->sf3, &m->su, &m->su2, &m->smv};
    for (unsigned i = 0; i < sizeof bufs / sizeof *bufs; i++)
        if (!(*bufs[i] = calloc(rows + (int64_t)K * dm, sizeof(float)))) return blt_free(m), NULL;
    m->sscore = calloc(smax, sizeof(float));
    m->svalid = calloc((int64_t)m->B * smax, 1);
    m->srow = calloc(3 * (int64_t)m->B, sizeof(int64_t));
    m->spos = calloc(3 * (int64_t)m->B, sizeof(int64_t));
    m->sl = calloc(2 * (int64_t)m->V, sizeof(float));
    m->sidx = calloc(2 * (int64_t)m->V, sizeof(int));
    if (!m->sscore || !m->svalid || !m->srow || !m->spos || !m->sl || !m->sidx) return blt_free(m), NULL;
    return m;
}

int blt_version(void) { return NATIVE_VERSION; }
