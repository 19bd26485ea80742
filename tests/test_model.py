"""The whole BLT on CPU (style §12.1, §12.4): causality through patcher and hash n-grams, packed
documents, masks, Flex vs SDPA, batching and padding, input validation, init determinism."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from bltkit.bytes import BOS_ID, EOS_ID, encode
from bltkit.checkpoint import init_model
from bltkit.config import PatcherConfig
from bltkit.distributed import compile_blocks
from bltkit.model import patching as P
from bltkit.model.attention import (
    attend,
    decoder_cross_mask,
    document_ids,
    encoder_cross_mask,
    global_mask,
    local_mask,
    packed_global_mask,
)
from bltkit.presets import tiny

TEXT = "The quick brown fox, naïve café owner, jumps over 13 lazy dogs — 漢字 too!"
DOC1 = "The first document talks about patches, bytes and entropy."
DOC2 = "Ünïcödé second doc: €42 and more words."

PATCHERS = {
    "entropy": PatcherConfig(mode="entropy"),
    "entropy-monotonic": PatcherConfig(mode="entropy", monotonicity=True, threshold=0.3),
    "entropy-add": PatcherConfig(mode="entropy", threshold=0.8, threshold_add=0.05),
    "space": PatcherConfig(mode="space"),
    "static": PatcherConfig(mode="static", patch_size=4),
    "byte": PatcherConfig(mode="byte"),
}
PATCHERS.update({f"{k}+max3": dataclasses.replace(v, max_patch_length=3) for k, v in list(PATCHERS.items())})


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.long)


@pytest.fixture
def model_for(make_tiny_model):
    """Factory: the tiny model (seed 0, entropy head x 8) with patcher PATCHERS[name]."""

    def make(name: str):
        return make_tiny_model(dataclasses.replace(tiny(), patcher=PATCHERS[name]))

    return make


def _assert_margin(model, x: torch.Tensor) -> None:
    """Entropies keep > 1e-3 from θ, so float-level differences cannot move a boundary."""
    with torch.no_grad():
        H = model.entropy_model.entropies(x)
    assert (H - model.config.patcher.threshold).abs().min() > 1e-3


def _logits(model, x, lengths=None):
    with torch.no_grad():
        return model(x, lengths)


def _perturbations(x: torch.Tensor, t: int) -> list[torch.Tensor]:
    """Copies of x with byte t replaced: another byte, a space, an EOS (new document after t)."""
    old = int(x[0, t])
    out = []
    for new in ((old - 4 + 97) % 256 + 4, ord(" ") + 4, EOS_ID):
        if new != old:
            y = x.clone()
            y[0, t] = new
            out.append(y)
    return out


def _probe_positions(lengths: torch.Tensor, T: int) -> list[int]:
    """Patch start, middle and end of the longest real patch, plus position 1 and the last."""
    row = [int(v) for v in lengths[0] if int(v) > 0]
    starts = [sum(row[:j]) for j in range(len(row))]
    j = max(range(1, len(row)), key=lambda i: (min(row[i], T - starts[i]), -i))
    s, n = starts[j], min(row[j], T - starts[j])  # bytes of the patch (the phantom excluded)
    return sorted({1, s, s + n // 2, s + n - 1, T - 1} & set(range(1, T)))


# ------------------------------------------------------------------------------------------
# (1) causality


def _assert_unchanged(got: torch.Tensor, want: torch.Tensor, same_patch_count: bool, msg: str) -> None:
    """Bitwise when the patch count is unchanged (identical shapes everywhere). When the
    perturbation adds or removes a later patch, the global transformer runs over P±1 patches and
    CPU SDPA blocks the key axis differently, so earlier patches' outputs may move by float
    reassociation only: a few units in the last place of the largest logit (|logit| <= 4.03
    here, an ulp 4.8e-7; measured ~1 ulp where this test was written, 2.5 ulps = 1.19e-6 on an
    AMD EPYC CPU with torch 2.13), bounded by 4 ulps; a leak moves logits by orders more."""
    if same_patch_count:
        assert torch.equal(got, want), msg
    else:
        ulp = torch.finfo(want.dtype).eps * want.abs().max().item()
        torch.testing.assert_close(got, want, atol=4 * ulp, rtol=0, msg=msg)


@pytest.mark.parametrize("name", sorted(PATCHERS))
def test_causality_through_patcher_and_hashes(model_for, name):
    """Changing byte t never changes logits at positions < t, with the model's own patcher:
    entropies, boundaries, hash n-grams, encoder, global model and decoder (see
    `_assert_unchanged` for when bitwise equality is required)."""
    model = model_for(name)
    x = ids(encode(TEXT))
    T = x.shape[1]
    lengths = model.patch(x)
    if not name.startswith("byte"):
        assert int(lengths.max()) >= 3, "the test needs multi-byte patches"
    assert lengths.shape[1] >= 4, "the test needs several patches"
    base = _logits(model, x)
    for t in _probe_positions(lengths, T):
        for y in _perturbations(x, t):
            out = _logits(model, y)
            _assert_unchanged(out[:, :t], base[:, :t], model.patch(y).shape[1] == lengths.shape[1],
                              f"{name}: byte {t} leaks into earlier logits")
            assert not torch.equal(out[:, t], base[:, t])  # the probe is not vacuous


def test_causality_entropy_model_alone(tiny_model):
    em = tiny_model.entropy_model
    x = ids(encode(TEXT))
    with torch.no_grad():
        base = em(x)
        for t in (1, 5, 17, x.shape[1] - 1):
            for y in _perturbations(x, t):
                out = em(y)
                assert torch.equal(out[:, :t], base[:, :t])
                assert not torch.equal(out[:, t], base[:, t])


def test_causality_with_explicit_lengths(tiny_model):
    """Same with fixed lengths (no patcher): only the layers and hashes are exercised."""
    x = ids(encode(TEXT))
    T = x.shape[1]
    lengths = torch.tensor([[1] + [4] * ((T - 1) // 4) + ([(T - 1) % 4 + 1])])
    base = _logits(tiny_model, x, lengths)
    for t in (1, 4, 5, 6, 8, T - 1):
        for y in _perturbations(x, t)[:2]:
            assert torch.equal(_logits(tiny_model, y, lengths)[:, :t], base[:, :t])  # same shapes: bitwise


class _HostReads:
    """Counts the calls that read a tensor's values on the host: on a GPU each is a device sync
    (`if t.any()`, `int(t.max())`, `.item()`, `.tolist()`, and ops whose output size depends on
    the values: nonzero, bincount, ...)."""

    METHODS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
    FUNCTIONS = ("nonzero", "bincount", "unique", "masked_select", "repeat_interleave", "argwhere")

    def __init__(self, monkeypatch, functions: bool = True):
        self.n = 0
        pairs = ((torch.Tensor, self.METHODS),) + (((torch, self.FUNCTIONS), (torch.Tensor, self.FUNCTIONS))
                                                   if functions else ())
        for owner, names in pairs:
            for name in names:
                orig = getattr(owner, name)

                def counted(*a, _orig=orig, **k):
                    self.n += 1
                    return _orig(*a, **k)

                monkeypatch.setattr(owner, name, counted)


def test_forward_without_validation_reads_nothing_on_host(tiny_model, monkeypatch):
    """`validate=False` (the trainer's call) leaves the training step with no host read of a
    tensor value, so the host can queue a step's work ahead of the GPU; the same logits and
    gradients as the validated call, which does read (ids' range, lengths' values)."""
    model = tiny_model.train()
    x = ids(encode(TEXT), encode(TEXT[::-1]))
    T = x.shape[1]
    lengths = P.normalize_lengths(torch.tensor([[1] + [4] * ((T - 1) // 4) + ([(T - 1) % 4 + 1])] * 2), T)
    grads, outs = [], []
    for validate in (True, False):
        model.zero_grad(set_to_none=True)
        reads = _HostReads(monkeypatch, functions=False)  # (the layout's nonzero reads the host lengths)
        logits = model(x, patch_lengths=lengths, validate=validate)
        logits.float().logsumexp(-1).sum().backward()
        monkeypatch.undo()
        assert (reads.n > 0) == validate, f"validate={validate}: {reads.n} host reads"
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        outs.append(logits.detach())
    assert torch.equal(*outs)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    # the packed global run (Flex and several rows; forced here): none either, given a layout
    # from host lengths (the trainer's); the forward itself makes that layout before any device work.
    # A layout for an unpacked run does not look for the real patches at all
    assert model.layout(lengths, T, validate=False).real_N is None
    try:
        model.pack_global = True
        lay = model.layout(model.pad_lengths(lengths), T, validate=False)
        assert lay.real_N is not None
        reads = _HostReads(monkeypatch)
        model.forward_layout(x, lay).float().logsumexp(-1).sum().backward()
        monkeypatch.undo()
        assert reads.n == 0, f"packed: {reads.n} host reads"
    finally:
        model.pack_global, model.pack_floor = None, 0


def test_prefix_consistency_own_patcher(tiny_model):
    """Logits at t from a forward over x[:n] equal those over the full x (spec §13.2.1).
    The prefix has fewer bytes and maybe fewer patches, so GEMM shapes change: 1e-5 absorbs the
    float reassociation; the boundaries themselves are compared exactly."""
    x = ids(encode(TEXT))
    _assert_margin(tiny_model, x)
    full = _logits(tiny_model, x)
    full_starts = tiny_model.patch_starts(x)
    for n in (2, 9, 30, x.shape[1] - 1):
        assert torch.equal(tiny_model.patch_starts(x[:, :n]), full_starts[:, :n + 1])
        torch.testing.assert_close(_logits(tiny_model, x[:, :n]), full[:, :n], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# (2) packed documents


def _packed() -> tuple[torch.Tensor, int]:
    a, b = encode(DOC1, eos=True), encode(DOC2, eos=True)
    return ids(a + b), len(a)


DOC_PATCHERS = ["entropy", "entropy-monotonic", "entropy-add", "space", "static", "byte", "entropy+max3",
                "static+max3"]


@pytest.mark.parametrize("name", DOC_PATCHERS)
def test_documents_are_isolated(model_for, name):
    """Bytes of doc1 more than 7 positions before doc2's BOS never reach doc2's logits.

    Hash n-grams span up to 7 previous ids by Meta's design (spec §5.1), so the last 7 bytes
    of doc1 may legitimately reach doc2. Tolerance 1e-5: if doc1's patch count changes, doc2's
    global RoPE positions shift; the relative rotation is equal only up to float rounding."""
    model = model_for(name)
    x, s = _packed()
    T = x.shape[1]
    base = _logits(model, x)
    base_starts = model.patch_starts(x)
    gen = torch.Generator().manual_seed(0)
    for trial in range(2):  # many bytes of doc1, then fewer
        y = x.clone()
        n = s - 8  # positions 1 .. s-8 are more than 7 before position s
        pos = torch.randperm(n, generator=gen)[: max(1, n // (trial + 1))] + 1
        y[0, pos] = torch.randint(4, 260, (len(pos),), generator=gen)
        assert not torch.equal(y, x)
        out = _logits(model, y)
        torch.testing.assert_close(out[:, s:], base[:, s:], atol=1e-5, rtol=1e-5)
        # doc2's own patching does not move either
        assert torch.equal(model.patch_starts(y)[:, s:], base_starts[:, s:])
    assert T > s + 8


@pytest.mark.parametrize("name", sorted(PATCHERS))
def test_patches_never_straddle_documents(model_for, name):
    docs = [encode("ab cd", eos=True), encode("xyz", eos=True), encode("élan vital", eos=True), encode("q")]
    x = ids([i for d in docs for i in d])
    starts = model_for(name).patch_starts(x)[0]
    boundary = 0
    for d in docs[:-1]:
        boundary += len(d)
        assert starts[boundary], f"{name}: a patch straddles the EOS at {boundary - 1}"
        assert starts[boundary + 1], f"{name}: the BOS at {boundary} is not alone"
    pid, _ = P.patch_ids(P.starts_to_lengths(starts[None]), x.shape[1])
    doc = document_ids(x)
    for p in pid.unique():
        assert doc[pid == p].unique().numel() == 1  # every patch lies within one document


def test_documents_isolated_in_entropy_model(tiny_model):
    """With doc_masks the entropy model alone is isolated bitwise, even from doc1's last bytes
    (it has no hash n-grams; same shapes and positions, masked keys weigh exactly 0)."""
    x, s = _packed()
    y = x.clone()
    y[0, 1 : s - 1] = torch.flip(x[0, 1 : s - 1], [0])  # scramble doc1, keep its EOS
    with torch.no_grad():
        a, b = tiny_model.entropy_model(y), tiny_model.entropy_model(x)
    assert torch.equal(a[:, s:], b[:, s:])
    assert not torch.equal(a[:, :s], b[:, :s])


# ------------------------------------------------------------------------------------------
# (3) masks, built by hand


def _hand_local(T, window, doc, q_offset):
    B = doc.shape[0] if doc is not None else 1
    m = torch.zeros(B, 1, T - q_offset, T, dtype=torch.bool)
    for b in range(B):
        for qi in range(T - q_offset):
            q = qi + q_offset
            for k in range(T):
                ok = k <= q and (window is None or q - k < window)
                if doc is not None:
                    ok = ok and bool(doc[b, q] == doc[b, k])
                m[b, 0, qi, k] = ok
    return m


def test_document_ids_hand_example():
    x = ids([1, 5, 2, 1, 6, 7, 2, 1, 8])  # EOS belongs to the document it closes
    assert document_ids(x).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2]]


@pytest.mark.parametrize("window", [None, 1, 3, 8, 64])
@pytest.mark.parametrize("q_offset", [0, 5])
@pytest.mark.parametrize("docs", [False, True])
def test_local_mask_equals_hand_built(window, q_offset, docs):
    T = 20
    x = ids([1] + [10] * 19, [1] * 20)
    x[0, [4, 11]] = EOS_ID
    x[1, [0, 1, 2, 15]] = EOS_ID
    doc = document_ids(x) if docs else None
    B = 2
    got = local_mask(T, window, doc, B, "cpu", "sdpa", q_offset=q_offset).dense()
    want = _hand_local(T, window, doc, q_offset).expand(B, 1, T - q_offset, T)
    assert torch.equal(got, want)


def test_global_mask_equals_hand_built():
    pdoc = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    got = global_mask(6, pdoc, 2, "cpu", "sdpa").dense()
    for b in range(2):
        for q in range(6):
            for k in range(6):
                assert bool(got[b, 0, q, k]) == (k <= q and bool(pdoc[b, q] == pdoc[b, k]))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_cross_masks_equal_hand_built(K):
    lengths = P.normalize_lengths(torch.tensor([[1, 3, 2, 0], [1, 1, 4, 0]]), 6)  # phantom patches
    pid, dec = P.patch_ids(lengths, 6)
    n_p = lengths.shape[1]
    enc = encoder_cross_mask(pid, n_p, K, "sdpa").dense()
    decm = decoder_cross_mask(dec, n_p, K, "sdpa").dense()
    assert enc.shape == (2, 1, n_p * K, 6)
    assert decm.shape == (2, 1, 6, n_p * K)
    for b in range(2):
        for u in range(n_p * K):
            for t in range(6):
                assert bool(enc[b, 0, u, t]) == (int(pid[b, t]) == u // K)  # unit u = p·K + r
                assert bool(decm[b, 0, t, u]) == (int(dec[b, t]) == u // K)
    # the phantom patch (index 3 of row 0) holds no byte: its units see no key
    assert not enc[0, 0, 3 * K:].any()


# ------------------------------------------------------------------------------------------
# (4) Flex vs SDPA


def _flex_ok():
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


needs_flex = pytest.mark.skipif(not _flex_ok(), reason="torch without flex_attention")


@pytest.fixture(scope="module")
def flex_shape_agnostic():
    """Eager flex_attention still goes through torch._dynamo (backend "eager") and re-traces
    (~1 s) for every new input shape. Tracing shapes symbolically from the start leaves one
    trace per mask kind; the ops that run, hence the numbers, are the same. Restored after."""
    import torch._dynamo

    old = torch._dynamo.config.assume_static_by_default
    torch._dynamo.config.assume_static_by_default = False
    yield
    torch._dynamo.config.assume_static_by_default = old


def _mask_cases(K: int):
    T = 24
    x = ids([1] + [40] * 23, [1] + [50] * 23)
    x[0, [7, 15]] = EOS_ID
    doc = document_ids(x)
    lengths = P.normalize_lengths(torch.tensor([[1, 5, 3, 6, 9, 0], [1, 2, 2, 2, 8, 9]]), T)
    pid, dec = P.patch_ids(lengths, T)
    n_p = lengths.shape[1]
    pdoc = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0]])
    return {
        "local": lambda impl: local_mask(T, 8, doc, 2, "cpu", impl),  # the window-8 model's mask
        "local-offset": lambda impl: local_mask(T, None, doc, 2, "cpu", impl, q_offset=9),
        "global": lambda impl: global_mask(n_p, pdoc, 2, "cpu", impl),
        "encoder-cross": lambda impl: encoder_cross_mask(pid, n_p, K, impl),
        "decoder-cross": lambda impl: decoder_cross_mask(dec, n_p, K, impl),
    }


FLEX_CASES = [  # (mask kind, cross_attn_k, kv heads); K only shapes the cross masks
    ("local", 2, 4), ("local-offset", 2, 4), ("global", 2, 4), ("local", 2, 2),
    *[(kind, K, 4) for kind in ("encoder-cross", "decoder-cross") for K in (1, 2, 3)],
    ("encoder-cross", 2, 2), ("decoder-cross", 3, 2),
]


@needs_flex
@pytest.mark.usefixtures("flex_shape_agnostic")
@pytest.mark.parametrize(("kind", "K", "kv_heads"), FLEX_CASES)
def test_flex_equals_sdpa(kind, K, kv_heads):
    """Tolerance 1e-5: eager flex and SDPA sum the same fp32 products in different orders."""
    make = _mask_cases(K)[kind]
    m_sdpa, m_flex = make("sdpa"), make("flex")
    gen = torch.Generator().manual_seed(K)
    # made like the model's layers make them ([B, L, N·H] -> view [B, L, N, H] -> [B, N, L, H]),
    # so the model test below reuses these dynamo traces instead of re-tracing for new strides
    q = torch.randn(2, m_sdpa.Q, 4 * 8, generator=gen).view(2, m_sdpa.Q, 4, 8).transpose(1, 2)
    k = torch.randn(2, m_sdpa.K, kv_heads * 8, generator=gen).view(2, m_sdpa.K, kv_heads, 8).transpose(1, 2)
    v = torch.randn(2, m_sdpa.K, kv_heads * 8, generator=gen).view(2, m_sdpa.K, kv_heads, 8).transpose(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        with torch.no_grad():  # same grad mode as the model test: dynamo traces are shared
            out_flex = attend(q, k, v, m_flex)
    out_sdpa = attend(q, k, v, m_sdpa)
    assert torch.isfinite(out_sdpa).all()
    assert torch.isfinite(out_flex).all()
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)
    empty = ~m_sdpa.dense().any(-1)  # B 1 Q: rows with no visible key give 0 on both paths
    if kind == "encoder-cross":
        assert empty.any()
    rows = empty.expand(2, 4, m_sdpa.Q)
    assert (out_sdpa[rows] == 0).all()
    assert (out_flex[rows] == 0).all()


def _random_layout_masks(T: int, seed: int, K: int, window: int | None, q_offset: int = 0, eos: float = 0.01):
    """Every mask kind on a random batch: documents of random length (an EOS at a byte with
    probability `eos`; the last row has none), random patch lengths (1..12 bytes, trailing empty
    patches as padding adds them)."""
    g = torch.Generator().manual_seed(seed)
    B = 3
    x = torch.randint(4, 260, (B, T), generator=g)
    x[:, 0] = BOS_ID
    x[:-1][torch.rand(B - 1, T, generator=g) < eos] = EOS_ID
    rows = []
    for _ in range(B):
        lengths, left = [1], T  # T+1 convention: a first patch of 1, then T bytes
        while left > 0:
            n = min(left, int(torch.randint(1, 13, (1,), generator=g)))
            lengths.append(n)
            left -= n
        rows.append(lengths)
    n_p = max(map(len, rows)) + 5
    lengths = torch.tensor([r + [0] * (n_p - len(r)) for r in rows])
    pid, dec = P.patch_ids(P.normalize_lengths(lengths, T), T)
    pdoc = torch.randint(0, 3, (B, n_p), generator=g).sort(1).values
    return {
        "local": local_mask(T, window, document_ids(x), B, "cpu", "flex", q_offset=q_offset),
        "global": global_mask(n_p, pdoc, B, "cpu", "flex"),
        "encoder-cross": encoder_cross_mask(pid, n_p, K, "flex"),
        "decoder-cross": decoder_cross_mask(dec, n_p, K, "flex"),
    }


def _blocks_any(dense: torch.Tensor, bs: int, reduce: str = "any") -> torch.Tensor:
    """[B, 1, Q, K] bool -> [B, Q blocks, K blocks]: which tiles hold a visible pair ("any"), or
    whose bs x bs pairs are all visible ("all": a tile cut short by Q or K never is, as in
    create_block_mask)."""
    B, _, Q, K = dense.shape
    d = torch.nn.functional.pad(dense[:, 0], (0, -K % bs, 0, -Q % bs))
    d = d.view(B, d.shape[1] // bs, bs, d.shape[2] // bs, bs)
    return d.any(4).any(2) if reduce == "any" else d.all(4).all(2)


def _tile_sets(mask, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial and the full tiles that `Mask.tiles` lists, as [B, Q blocks, K blocks] bools."""
    part_num, part_idx, full_num, full_idx = mask.tiles(bs)
    sets = []
    for num, idx in ((part_num, part_idx), (full_num, full_idx)):
        chosen = torch.arange(idx.shape[-1]) < num[..., None]
        sets.append(torch.zeros(chosen.shape, dtype=torch.long).scatter_add(-1, idx.long(), chosen.long()) > 0)
    return sets[0], sets[1]


@pytest.mark.parametrize(("T", "K", "window", "q_offset", "bs"),
                         [(37, 2, 8, 0, 4), (64, 1, None, 0, 8), (50, 3, 5, 9, 4), (29, 2, None, 7, 16)])
def test_kv_block_ranges_cover_every_visible_key(T, K, window, q_offset, bs):
    """The key-block ranges that build the FlexAttention BlockMask without evaluating mask_mod
    densely must hold every visible (query, key) pair: compiled Flex skips a tile not listed
    (eager Flex on a CPU does not, so the outputs alone could not catch a gap). For the cross
    masks the ranges are exact: a query tile's keys are one contiguous run. A tile listed as full
    (the kernel skips mask_mod there) must have every pair visible, and for the local and global
    masks every such tile is listed full."""
    for seed in range(4):
        for kind, mask in _random_layout_masks(T, seed, K, window, q_offset).items():
            need = _blocks_any(mask.dense(), bs)
            lo, hi = mask.kv_block_range(bs)
            kv = torch.arange(need.shape[2])
            have = (kv >= lo[..., None]) & (kv < hi[..., None])
            assert not (need & ~have).any(), (kind, seed)
            if kind.endswith("cross"):
                assert torch.equal(need, have), (kind, seed)
            partial, full = _tile_sets(mask, bs)
            assert not (partial & full).any()
            assert torch.equal(partial | full, have), (kind, seed)
            all_visible = _blocks_any(mask.dense(), bs, "all")
            assert not (full & ~all_visible).any(), (kind, seed)
            if not kind.endswith("cross"):
                assert torch.equal(full, all_visible & have), (kind, seed)


@needs_flex
def test_block_masks_built_from_ranges_match_create_block_mask():
    """At Flex's real tile (128), several tiles per side: the BlockMask built from the ranges
    lists every tile create_block_mask finds, exactly those for the cross masks, and the same
    full tiles (mask_mod skipped) for the local and global masks."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    def full_tiles(bm):
        return BlockMask.from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=bm.BLOCK_SIZE,
                                        seq_lengths=bm.seq_lengths).to_dense()[:, 0].bool()

    for kind, mask in _random_layout_masks(700, 0, 2, 512).items():
        ours_bm = mask.block_mask()
        ref_bm = create_block_mask(mask.mask_mod, mask.B, None, mask.Q, mask.K, device="cpu")
        ours, ref = ours_bm.to_dense()[:, 0].bool(), ref_bm.to_dense()[:, 0].bool()
        assert not (ref & ~ours).any(), kind
        if kind.endswith("cross"):
            assert torch.equal(ours, ref), kind
        elif ours_bm.full_kv_num_blocks is not None:
            assert torch.equal(full_tiles(ours_bm), full_tiles(ref_bm)), kind


@needs_flex
def test_compiled_flex_honours_range_built_block_masks():
    """Compiled Flex (inductor's CPU kernel, which like the GPU one visits only the tiles a
    BlockMask lists and skips mask_mod in full tiles) with the range-built masks equals the dense
    reference for every mask kind, over several 128-tiles and ragged rows. Eager Flex ignores the
    tile lists, so only a compiled kernel catches a missing or wrongly full tile; dropping one
    needed tile must show (the kernel really is the compiled one). Tolerance 1e-5: fp32."""
    import shutil

    import torch._dynamo
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor's CPU kernels need a C++ compiler")
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            compiled = torch.compile(flex_attention, dynamic=False)
            masks = _random_layout_masks(300, 1, 2, 160)
            row = torch.tensor([0] * 150 + [1] * 200 + [2] * 90 + [3] * 72)  # 3 rows + padding slots
            start = torch.tensor([0] * 150 + [150] * 200 + [350] * 90 + [440] * 72)
            pdoc = torch.tensor([0] * 100 + [1] * 50 + [0] * 200 + [0] * 40 + [1] * 50 + [0] * 72)
            masks["packed-global"] = packed_global_mask(row, pdoc, start, "flex")
            g = torch.Generator().manual_seed(0)
            for kind, mask in masks.items():
                q = torch.randn(mask.B, 2, mask.Q, 16, generator=g)
                k, v = (torch.randn(mask.B, 2, mask.K, 16, generator=g) for _ in range(2))
                dense = mask.dense()
                has_key = dense.any(-1, keepdim=True)
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense | ~has_key).masked_fill(~has_key, 0)
                bm = mask.block_mask()
                torch.testing.assert_close(compiled(q, k, v, block_mask=bm), ref, atol=1e-5, rtol=1e-5, msg=kind)
            # the encoder cross mask with its first query tile's key tiles dropped: no longer equal
            broken = BlockMask.from_kv_blocks(bm.kv_num_blocks.clone().index_fill_(2, torch.tensor([0]), 0),
                                              bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                              BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)
            assert not torch.allclose(compiled(q, k, v, block_mask=broken), ref, atol=1e-3)
    finally:
        torch._dynamo.reset()


@needs_flex
@pytest.mark.parametrize("block_mode", ["eager", "compiled"])
def test_model_compiled_flex_equals_sdpa(make_tiny_model, monkeypatch, block_mode):
    """The GPU's path on a CPU: compiled Flex (which visits only listed tiles) through a whole
    forward, rows of different patch counts (the global transformer packed), documents, windows
    shorter than the rows; the same logits as the SDPA reference within 1e-5 (fp32). "compiled":
    every block compiled as `train.compile` does it, the BlockMasks built outside them (traced
    inside a block, the mask's construction failed to compile)."""
    import shutil

    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    from bltkit.model import attention

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor's CPU kernels need a C++ compiler")
    cfg = tiny()
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, window=160),
                              decoder=dataclasses.replace(cfg.decoder, window=160))
    model = make_tiny_model(cfg)
    T = 400
    text = encode(TEXT * 20)
    x = torch.tensor([text[:T], text[300:300 + T], text[700:700 + T]])
    x[0, 150] = x[2, 333] = EOS_ID
    g = torch.Generator().manual_seed(0)
    rows = []
    for longest in (3, 9, 15):  # patch counts ~200, ~80, ~50
        lengths, left = [1], T
        while left > 0:
            lengths.append(min(left, int(torch.randint(1, longest + 1, (1,), generator=g))))
            left -= lengths[-1]
        rows.append(lengths)
    n_p = max(map(len, rows))
    lengths = torch.tensor([r + [0] * (n_p - len(r)) for r in rows])
    ref = _logits(model, x, lengths)
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    monkeypatch.setattr(attention, "_flex_attention", lambda: (compiled, compiled))
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            model.set_attn_impl("flex")
            if block_mode == "compiled":
                compile_blocks(model)  # as the trainer compiles them
            out = _logits(model, x, lengths)
    finally:
        model.set_attn_impl("sdpa")
        torch._dynamo.reset()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mask_rejects_unknown_impl():
    with pytest.raises(ValueError, match="sdpa"):
        local_mask(4, None, None, 1, "cpu", "xformers")


@needs_flex
@pytest.mark.usefixtures("flex_shape_agnostic")
def test_model_flex_equals_sdpa(make_tiny_model):
    """Whole forward, own patcher, window 8 (shorter than the rows), packed documents, batch 2.
    Tolerance 1e-5: different summation orders in attention; the boundaries are compared
    exactly (margin asserted)."""
    cfg = tiny()
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, window=8),
                              decoder=dataclasses.replace(cfg.decoder, window=8),
                              entropy_model=dataclasses.replace(cfg.entropy_model, window=8))
    model = make_tiny_model(cfg)
    a, _ = _packed()
    b = ids(encode(TEXT + " " + TEXT)[: a.shape[1]])
    x = torch.cat([a, b])
    _assert_margin(model, x)
    ref = _logits(model, x)
    ref_lengths = model.patch(x)
    model.set_attn_impl("flex")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(model.patch(x), ref_lengths)
        out = _logits(model, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_flex
@pytest.mark.usefixtures("flex_shape_agnostic")
def test_packed_global_transformer_equals_padded(tiny_model):
    """With Flex and several rows the global transformer runs over the real patches packed into
    one sequence. Rows of very different patch counts (1-byte patches against 9-byte ones, with
    documents): logits (Flex, and SDPA with packing forced) and every gradient (SDPA: Flex has no
    backward on a CPU) equal the padded [B, P] run within fp32 reassociation (1e-5); the packed
    mask's key-tile ranges cover every visible pair."""
    from bltkit.model import blt as blt_module

    T = 60
    x = ids([1] + [40 + i % 30 for i in range(T - 1)], [1] + [90] * (T - 1), [1] + [60 + i % 7 for i in range(T - 1)])
    x[0, 20] = x[2, 33] = EOS_ID
    rows = [[1] + [1] * T, [1] + [9] * 6 + [T - 54], [1] + [4, 2, 7] * 4 + [T - 52]]
    n_p = max(map(len, rows)) + 3  # trailing empty patches, as padding adds them
    lengths = torch.tensor([r + [0] * (n_p - len(r)) for r in rows])
    out, grads = {}, {}
    try:
        tiny_model.set_attn_impl("flex")
        for packed in (False, None):  # None: packs, since Flex
            tiny_model.pack_global = packed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out["flex", packed is None] = _logits(tiny_model, x, lengths)
        tiny_model.set_attn_impl("sdpa")
        tiny_model.train()
        for packed in (False, True):
            tiny_model.pack_global = packed
            tiny_model.zero_grad()
            logits = tiny_model(x, lengths)
            logits.square().mean().backward()
            out["sdpa", packed] = logits.detach()
            grads[packed] = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        # lengths on the host give the layout the real patches' indices; lengths on the device
        # (none here) leave them to the packed run's nonzero: both the same
        lay = tiny_model.layout(tiny_model.pad_lengths(lengths), T)
        assert lay.real_N is not None
        with torch.no_grad():
            on_device = tiny_model.forward_layout(x, dataclasses.replace(lay, real_N=None))
        assert torch.equal(on_device, out["sdpa", True])
        assert tiny_model.pack_floor == blt_module.PACK_MULTIPLE  # a training forward: 93 slots, rounded up
        # rounding: a multiple of 512, or of 1/8 of the power of two below, so few lengths compile
        assert [blt_module.packed_length(n) for n in (1, 512, 513, 8192, 8193, 20000)] == \
            [512, 512, 1024, 8192, 9216, 20480]
    finally:
        tiny_model.pack_global, tiny_model.pack_floor = None, 0
        tiny_model.eval()
        tiny_model.set_attn_impl("sdpa")
    for key in (("flex", False), ("flex", True), ("sdpa", True)):
        torch.testing.assert_close(out[key], out["sdpa", False], atol=1e-5, rtol=1e-5, msg=str(key))
    assert grads[True].keys() == grads[False].keys()
    assert any(n.startswith("global_transformer.") for n in grads[True])
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-5, rtol=1e-5, msg=n)

    # the mask by itself: three rows of 5, 3 and 4 slots, two documents in the first, 4 padding slots
    row = torch.tensor([0] * 5 + [1] * 3 + [2] * 4 + [3] * 4)
    start = torch.tensor([0] * 5 + [5] * 3 + [8] * 4 + [12] * 4)
    pdoc = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    mask = packed_global_mask(row, pdoc, start, "flex")
    dense = mask.dense()[0, 0]
    q, kv = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    assert torch.equal(dense, (kv <= q) & (row[q] == row[kv]) & (pdoc[q] == pdoc[kv]))
    for bs in (2, 3, 4):
        partial, full = _tile_sets(mask, bs)
        assert not (_blocks_any(mask.dense(), bs) & ~(partial | full)).any()
        assert torch.equal(full, _blocks_any(mask.dense(), bs, "all"))


def test_set_attn_impl_rejects_unknown(tiny_model):
    with pytest.raises(ValueError, match="flex"):
        tiny_model.set_attn_impl("eager")


# ------------------------------------------------------------------------------------------
# (5) batches and padding


def _rows(n: int, T: int) -> torch.Tensor:
    texts = [TEXT, DOC1 + " " + DOC2, "0123456789 abcdefghij ÀÉÎÕÜ !?!? " * 3]
    return ids(*[encode(t)[:T] for t in texts[:n]])


def test_batch_rows_equal_rows_alone(tiny_model):
    """Tolerance 1e-5: batched GEMMs/attention may block differently than single rows."""
    x = _rows(3, 60)
    assert x.shape == (3, 60)
    _assert_margin(tiny_model, x)
    out = _logits(tiny_model, x)
    lengths = tiny_model.patch(x)
    for r in range(3):
        alone_lengths = tiny_model.patch(x[r:r + 1])
        assert [v for v in lengths[r].tolist() if v] == [v for v in alone_lengths[0].tolist() if v]
        torch.testing.assert_close(out[r:r + 1], _logits(tiny_model, x[r:r + 1]), atol=1e-5, rtol=1e-5)


def test_right_padding_does_not_change_real_positions(tiny_model):
    """Right-padding with BOE (0) leaves logits at real positions unchanged (1e-5: different
    sequence and patch counts change GEMM shapes)."""
    long, short = _rows(2, 60)[0], _rows(2, 60)[1, :37]
    padded = torch.cat([short, torch.zeros(60 - 37, dtype=torch.long)])
    x = torch.stack([long, padded])
    _assert_margin(tiny_model, long[None])
    _assert_margin(tiny_model, short[None])  # the pad region's boundaries do not matter
    out = _logits(tiny_model, x)
    alone = _logits(tiny_model, short[None])
    torch.testing.assert_close(out[1:, :37], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:1], _logits(tiny_model, long[None]), atol=1e-5, rtol=1e-5)


def test_padded_patch_counts_change_no_logit(tiny_model):
    """forward's padding for compiled Flex (pad_patches_multiple / _floor) adds only empty
    trailing patches: the same logits, within fp32 reassociation (1e-5)."""
    x = torch.tensor([encode(TEXT)])
    with torch.no_grad():
        ref = tiny_model(x)
        P = tiny_model.patch(x).shape[1]
        try:
            tiny_model.pad_patches_multiple, tiny_model.pad_patches_floor = 16, 0
            assert tiny_model.pad_lengths(tiny_model.patch(x)).shape[1] == -(-P // 16) * 16
            torch.testing.assert_close(tiny_model(x), ref, rtol=0, atol=1e-5)
            tiny_model.pad_patches_floor = P + 40  # a larger count from training: reused as is
            assert tiny_model.pad_lengths(tiny_model.patch(x)).shape[1] == P + 40
            torch.testing.assert_close(tiny_model(x), ref, rtol=0, atol=1e-5)
            was_training = tiny_model.training
            tiny_model.pad_patches_floor = 0
            tiny_model.train()  # a training forward raises the floor to its padded count, grow-only
            tiny_model(x)
            assert tiny_model.pad_patches_floor == -(-P // 16) * 16
            tiny_model(x[:, :3])
            assert tiny_model.pad_patches_floor == -(-P // 16) * 16
            tiny_model.train(was_training)
        finally:
            tiny_model.pad_patches_multiple, tiny_model.pad_patches_floor = 1, 0


@pytest.mark.parametrize("T", [1, 2, 5, 30])
def test_sum_t_lengths_equal_t_plus_1_form(tiny_model, T):
    """transformers-style lengths (sum T, trailing 0 marker) give the same logits as Meta's
    T+1 form, bitwise (identical layouts after normalisation)."""
    x = ids(encode(TEXT)[:T])
    meta = tiny_model.patch(x)
    starts = P.lengths_to_starts(meta, T + 1)[0]
    hf = meta.clone()
    hf[0, -1] -= 1  # remove the phantom position; a trailing 0 stays if it opened its own patch
    assert int(hf.sum()) == T
    assert torch.equal(P.normalize_lengths(hf, T), meta), f"starts {starts.nonzero().flatten().tolist()}"
    assert torch.equal(_logits(tiny_model, x, hf), _logits(tiny_model, x))


def test_bos_only_with_sum_t_lengths(tiny_model):
    """T = 1, lengths [1] (sum T): position 1 always starts a patch, so this is [1, 1] and the
    BOS reads its own patch, as with the model's own patching (and transformers, d(0) = 0)."""
    x = ids([BOS_ID])
    assert tiny_model.patch(x).tolist() == [[1, 1]]
    assert torch.equal(_logits(tiny_model, x, torch.tensor([[1]])), _logits(tiny_model, x))


# ------------------------------------------------------------------------------------------
# (6) bad input


@pytest.mark.parametrize(("x", "match"), [
    (ids([1, 260, 5]), r"0\.\.259"),
    (ids([1, -1, 5]), r"0\.\.259"),
    (torch.tensor([1, 76, 105]), r"\[batch, bytes\]"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.ones(1, 2, 3, dtype=torch.long), r"\[batch, bytes\]"),
])
def test_bad_tokens(tiny_model, x, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(x)


def test_too_long(make_tiny_model):
    model = make_tiny_model(dataclasses.replace(tiny(), max_bytes=16))
    model(ids([1] * 16))
    with pytest.raises(ValueError, match=r"17 bytes exceeds.*16.*max_bytes"):
        model(ids([1] * 17))


def test_too_many_patches(make_tiny_model):
    model = make_tiny_model(dataclasses.replace(tiny(), max_patches=4))
    with pytest.raises(ValueError, match="max_patches"):
        model(ids([1] * 8), torch.tensor([[1] * 9]))


@pytest.mark.parametrize(("lengths", "match"), [
    ([[2, 4, 4]], "first patch must have length 1"),
    ([[1, 4, 4]], "sum to the sequence length 10 or 11"),
    ([[1, 4, 0, 5]], "non-empty patch follows an empty one"),
    ([[1, 4, -4, 10]], ">= 0"),
])
def test_bad_patch_lengths(tiny_model, lengths, match):
    x = ids(encode("abcdefghi"))  # 10 ids
    with pytest.raises(ValueError, match=match):
        tiny_model(x, torch.tensor(lengths))


@pytest.mark.parametrize("n_rows", [2, 1, 4])
def test_patch_lengths_wrong_batch_size(tiny_model, n_rows):
    x = ids(*[encode("abcdefghi")] * 3)
    lengths = torch.tensor([[1, 4, 5]] * n_rows)
    with pytest.raises(ValueError, match="batch"):
        tiny_model(x, lengths)


# ------------------------------------------------------------------------------------------
# (7) init determinism


def test_init_is_deterministic():
    a = init_model(tiny(), seed=0).state_dict()
    torch.manual_seed(1234)  # the global RNG must not matter
    b = init_model(tiny(), seed=0).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_init_seeds_differ():
    a = init_model(tiny(), seed=0).state_dict()
    b = init_model(tiny(), seed=1).state_dict()
    for k in a:
        if "norm" in k:
            assert torch.equal(a[k], b[k])  # norm weights start at 1
        else:
            assert not torch.equal(a[k], b[k]), f"{k} does not depend on the seed"


def test_init_entropy_model_is_frozen_and_finite():
    model = init_model(tiny(), seed=0)
    assert not any(p.requires_grad for p in model.entropy_model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("entropy_model."))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize(("T", "window", "q_offset", "kv_heads"), [(20, 3, 0, 2), (33, 8, 0, 4), (33, 8, 5, 1), (64, 16, 0, 4)])
def test_banded_reference_attention_equals_dense(T, window, q_offset, kv_heads):
    """The sdpa path attends a sliding window block by block (O(T x window)); values and
    gradients equal the dense mask's within fp32 reassociation (1e-6), documents included."""
    from bltkit.model.attention import _attend_dense

    g = torch.Generator().manual_seed(T + window)
    tokens = torch.randint(3, 9, (2, T), generator=g)
    tokens[0, T // 3] = EOS_ID
    tokens[1, T // 2] = EOS_ID
    mask = local_mask(T, window, document_ids(tokens), 2, "cpu", "sdpa", q_offset=q_offset)
    assert mask.band == window  # the banded path runs
    assert mask.K > 2 * window
    q = torch.randn(2, 4, T - q_offset, 8, generator=g, requires_grad=True)
    k = torch.randn(2, kv_heads, T, 8, generator=g, requires_grad=True)
    v = torch.randn(2, kv_heads, T, 8, generator=g, requires_grad=True)
    banded = attend(q, k, v, mask)
    dense = _attend_dense(q, k, v, mask.dense(), kv_heads != 4)
    torch.testing.assert_close(banded, dense, rtol=0, atol=1e-6)
    gb = torch.autograd.grad(banded.square().sum(), (q, k, v))
    gd = torch.autograd.grad(dense.square().sum(), (q, k, v))
    for a, b in zip(gb, gd, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("K", "kv_heads"), [(1, 4), (2, 4), (2, 2), (4, 1)])
def test_gathered_decoder_cross_attention_equals_dense(K, kv_heads):
    """The sdpa path gathers each byte's K units (O(T x K)) instead of masking all P x K; values
    and gradients equal the dense mask's within fp32 reassociation, bytes with no patch give 0."""
    from bltkit.model.attention import _attend_dense

    g = torch.Generator().manual_seed(K * 10 + kv_heads)
    B, T, P = 2, 37, 7
    dec = torch.randint(0, P, (B, T), generator=g)
    dec[0, :3] = -1  # before the first patch
    dec[1, -2:] = P  # past the last one
    mask = decoder_cross_mask(dec, P, K, "sdpa")
    assert mask.select is not None  # the gathered path runs
    q = torch.randn(B, 4, T, 8, generator=g, requires_grad=True)
    k = torch.randn(B, kv_heads, P * K, 8, generator=g, requires_grad=True)
    v = torch.randn(B, kv_heads, P * K, 8, generator=g, requires_grad=True)
    gathered = attend(q, k, v, mask)
    dense = _attend_dense(q, k, v, mask.dense(), kv_heads != 4)
    torch.testing.assert_close(gathered, dense, rtol=0, atol=1e-6)
    assert gathered[0, :, :3].abs().max() == 0
    assert gathered[1, :, -2:].abs().max() == 0
    ga = torch.autograd.grad(gathered.square().sum(), (q, k, v))
    gd = torch.autograd.grad(dense.square().sum(), (q, k, v))
    for a, b in zip(ga, gd, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
