"""Parity with transformers' BltForCausalLM 5.23.0 on the tiny random config of spec §15.

The oracle is built locally (tests/hf_oracle.py), saved with `save_pretrained` and read by our
importer. Inputs follow spec §15.4 (BOS + bytes, N >= 64, bytes >= 0x80, no EOS mid-stream).
Tolerances: spec §15.6 (entropies 1e-5, logits atol = rtol = 1e-5; boundaries exact).
"""

from __future__ import annotations

import pytest
import torch

from bltkit.bytes import encode
from bltkit.model import patching as P

pytestmark = pytest.mark.hf
pytest.importorskip("transformers")

THETA = 1.335442066192627
TEXT = "Byte Latent Transformers group bytes into patches by entropy: naïve café, 漢字, €5 and more!"
OTHER = "A second row of the same length: ÀÉÎÕÜ øæå — spaces, digits 0123456789 and punctuation?!"
VARIANTS = {
    "base": {},
    "window8": {"window": 8},  # local and patcher windows shorter than the input
    "global48": {"global_dim": 48},  # k·De = 64 != 48: the global token_embedding_projection
    "kv2": {"kv_heads": 2},  # GQA in self- and cross-attention (our cross_attn_n_kv_heads)
}


def tokens(text: str = TEXT, n: int | None = None) -> torch.Tensor:
    ids = encode(text)
    return torch.tensor([ids[:n] if n else ids])


@pytest.fixture(params=sorted(VARIANTS))
def pair(request, hf_pair):
    return hf_pair(**VARIANTS[request.param])


def ours_logits(model, x, lengths=None):
    with torch.no_grad():
        return model(x, lengths)


def hf_starts(lengths_BP: torch.Tensor, T: int) -> torch.Tensor:
    """Starts [B, T+1] from transformers' lengths (sum T; a trailing 0 marks a start at T)."""
    B = lengths_BP.shape[0]
    starts = torch.zeros(B, T + 1, dtype=torch.bool)
    ends = lengths_BP.long().cumsum(1)[:, :-1]  # start of every patch after the first
    starts[:, 0] = True
    starts.scatter_(1, ends, True)
    return starts


def test_inputs_match_spec_15_4():
    x = tokens()
    assert x.shape[1] >= 64
    assert int(x.max()) >= 0x80 + 4
    assert not (x[0, 1:] == 2).any()
    assert tokens(OTHER).shape[1] >= x.shape[1]


def test_entropies_and_boundaries(pair, hf_oracle):
    hf, ours = pair
    x = tokens()
    H_hf, L_hf = hf_oracle.hf_patcher(hf, x)
    with torch.no_grad():
        H = ours.entropy_model.entropies(x)
    assert (H_hf - THETA).abs().min() > 1e-3  # boundaries robust to 1e-5 entropy differences
    torch.testing.assert_close(H, H_hf, atol=1e-5, rtol=0)
    assert int(L_hf.sum()) == x.shape[1]  # transformers: lengths sum to T
    assert int(ours.patch(x).sum()) == x.shape[1] + 1  # ours: T+1
    assert torch.equal(ours.patch_starts(x), hf_starts(L_hf, x.shape[1]))
    assert L_hf.shape[1] >= 8
    assert int(L_hf.max()) >= 3


def test_own_patcher_logits(pair, hf_oracle):
    hf, ours = pair
    x = tokens()
    torch.testing.assert_close(ours_logits(ours, x), hf_oracle.hf_logits(hf, x), atol=1e-5, rtol=1e-5)


def _patterns(N: int, patcher_lengths: torch.Tensor) -> dict[str, list[int]]:
    fours = [1] + [4] * ((N - 1) // 4) + ([(N - 1) % 4] if (N - 1) % 4 else [])
    return {
        "patcher": patcher_lengths[0].tolist(),
        "fours": fours,  # [1] + [4, 4, ...]
        "ones": [1] * N,
        "one-long": [1, N - 1],
        "trailing-zero": [*fours, 0],  # HF convention: a patch starts at position N
    }


@pytest.mark.parametrize("pattern", ["patcher", "fours", "ones", "one-long", "trailing-zero"])
def test_explicit_lengths_logits(pair, hf_oracle, pattern):
    hf, ours = pair
    x = tokens()
    N = x.shape[1]
    lengths = torch.tensor([_patterns(N, hf_oracle.hf_patcher(hf, x)[1])[pattern]])
    assert int(lengths.sum()) == N
    assert lengths[0, 0] == 1
    want = hf_oracle.hf_logits(hf, x, lengths)
    torch.testing.assert_close(ours_logits(ours, x, lengths), want, atol=1e-5, rtol=1e-5)


def test_trailing_zero_differs_from_no_marker(pair, hf_oracle):
    """Guard: the marker changes what the last byte reads, so the pattern above is not vacuous."""
    _hf, ours = pair
    x = tokens()
    fours = _patterns(x.shape[1], torch.ones(1, 1))["fours"]
    a = ours_logits(ours, x, torch.tensor([fours]))
    b = ours_logits(ours, x, torch.tensor([[*fours, 0]]))
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def _random_composition(total: int, parts: int, gen: torch.Generator) -> list[int]:
    cuts = sorted(torch.randperm(total - 1, generator=gen)[: parts - 1].add(1).tolist())
    return [e - s for s, e in zip([0, *cuts], [*cuts, total], strict=True)]


def test_batch_of_two_rows(pair, hf_oracle):
    """Two rows of equal length with different explicit lengths (same patch count, no padding)."""
    hf, ours = pair
    N = tokens().shape[1]
    x = torch.cat([tokens(), tokens(OTHER, N)])
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([[1, *_random_composition(N - 1, 15, gen)] for _ in range(2)])
    assert not torch.equal(lengths[0], lengths[1])
    want = hf_oracle.hf_logits(hf, x, lengths)
    torch.testing.assert_close(ours_logits(ours, x, lengths), want, atol=1e-5, rtol=1e-5)


def test_prefix_consistency_against_full(pair, hf_oracle):
    """Logits at t from a full forward of a prefix equal those of a longer input (spec §13.2.1),
    across implementations both ways: HF prefix vs our full input and ours vs HF's."""
    hf, ours = pair
    x = tokens()
    N = x.shape[1]
    ours_full = ours_logits(ours, x)
    hf_full = hf_oracle.hf_logits(hf, x)
    for n in (5, 23, 40, N - 1):
        hf_prefix = hf_oracle.hf_logits(hf, x[:, :n])
        our_prefix = ours_logits(ours, x[:, :n])
        torch.testing.assert_close(hf_prefix, ours_full[:, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(our_prefix, hf_full[:, :n], atol=1e-5, rtol=1e-5)


def test_import_config_mapping(hf_pair):
    _, ours = hf_pair(kv_heads=2)
    c = ours.config
    assert c.encoder.n_kv_heads == 2
    assert c.encoder.cross_attn_n_kv_heads == 2
    assert c.decoder.cross_attn_n_kv_heads == 2
    assert c.decoder.cross_attn_n_heads == 4
    assert c.hash_functions == 2
    assert c.hash_vocab == 101
    assert c.cross_attn_k == 2
    assert c.patcher.mode == "entropy"
    assert c.patcher.threshold == THETA
    _, ours = hf_pair(global_dim=48)
    assert ours.config.has_global_projection
    assert ours.global_transformer.token_embedding_projection.weight.shape == (48, 64)
    _, ours = hf_pair(window=8)
    assert ours.config.encoder.window == ours.config.decoder.window == ours.config.entropy_model.window == 8
    hf, ours = hf_pair()
    assert len(hf.state_dict()) == 90  # spec §11.3: the tiny parity config has 90 tensors
    assert len(ours.state_dict()) == 90


# ------------------------------------------------------------------------------------------
# ours -> transformers -> ours


def test_export_import_round_trip_is_bit_exact(tmp_path, tiny_model):
    from bltkit.convert.hf import export_hf, import_hf

    out = export_hf(tiny_model, tmp_path / "hf")
    back = import_hf(out)
    assert back.config == tiny_model.config
    a, b = tiny_model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_export_refuses_patching_transformers_cannot_run(tmp_path, tiny_model):
    """transformers' patcher has one global entropy threshold (or a patch a byte): a model that
    patches by spaces, statically, monotonically or with threshold_add was exported as entropy
    patching, which transformers then ran with other patches (logits off by ~2); now refused,
    as is an entropy model alone (an AttributeError before). A byte-patching model exports."""
    import dataclasses

    from bltkit.convert.hf import export_hf

    base = tiny_model.config
    try:
        for change, match in (({"mode": "space"}, "patches by 'space'"),
                              ({"mode": "static", "patch_size": 4}, "'static'"),
                              ({"monotonicity": True}, "monotonically"), ({"threshold_add": 0.1}, "threshold_add")):
            tiny_model.config = dataclasses.replace(base, patcher=dataclasses.replace(base.patcher, **change))
            with pytest.raises(ValueError, match=match):
                export_hf(tiny_model, tmp_path / "hf")
        tiny_model.config = dataclasses.replace(base, patcher=dataclasses.replace(base.patcher, mode="byte"))
        export_hf(tiny_model, tmp_path / "hf")
    finally:
        tiny_model.config = base
    with pytest.raises(ValueError, match="no class for EntropyModel alone"):
        export_hf(tiny_model.entropy_model, tmp_path / "ent")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_import_by_hub_repository_id(tiny_model, hub_cache):
    """import_hf takes a hub id that is no local path from huggingface_hub's cache (offline)."""
    from bltkit.convert.hf import export_hf, import_hf

    snapshot = hub_cache("fakeorg/blt-hf")
    snapshot.rmdir()  # (export_hf writes the folder itself)
    export_hf(tiny_model, snapshot)
    back = import_hf("fakeorg/blt-hf")
    assert back.config == tiny_model.config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), tiny_model.state_dict().values(),
                                                 strict=True))


def test_transformers_loads_our_export(tmp_path, tiny_model, hf_oracle):
    from transformers import BltForCausalLM

    from bltkit.convert.hf import export_hf

    out = export_hf(tiny_model, tmp_path / "hf")
    hf = BltForCausalLM.from_pretrained(out).eval()
    x = tokens()
    with torch.no_grad():
        H = tiny_model.entropy_model.entropies(x)
    assert (H - THETA).abs().min() > 1e-3  # boundaries robust
    H_hf, L_hf = hf_oracle.hf_patcher(hf, x)
    torch.testing.assert_close(H, H_hf, atol=1e-5, rtol=0)
    assert torch.equal(tiny_model.patch_starts(x), hf_starts(L_hf, x.shape[1]))
    torch.testing.assert_close(ours_logits(tiny_model, x), hf_oracle.hf_logits(hf, x), atol=1e-5, rtol=1e-5)
    lengths = torch.tensor([_patterns(x.shape[1], L_hf)["fours"]])
    torch.testing.assert_close(ours_logits(tiny_model, x, lengths), hf_oracle.hf_logits(hf, x, lengths),
                               atol=1e-5, rtol=1e-5)


def test_hf_starts_helper():
    # [1,3,2] (sum 6): starts 0,1,4; [1,3,2,0]: also 6
    assert hf_starts(torch.tensor([[1, 3, 2]]), 6)[0].nonzero().flatten().tolist() == [0, 1, 4]
    assert hf_starts(torch.tensor([[1, 3, 2, 0]]), 6)[0].nonzero().flatten().tolist() == [0, 1, 4, 6]
    assert torch.equal(hf_starts(torch.tensor([[1, 3, 2, 0]]), 6),
                       P.lengths_to_starts(torch.tensor([[1, 3, 2, 1]]), 7))
