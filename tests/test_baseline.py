"""bltkit.eval.baseline: a tokenized (BPE) model's bits per byte on the same documents as a BLT's,
with a GPT-2 and a byte-level BPE tokenizer made here (no network)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from bltkit.eval.baseline import baseline_bpb, load_baseline  # noqa: E402

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 6


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    end = fast.eos_token_id
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=end, eos_token_id=end)).save_pretrained(out)
    return out


def _docs(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT[:300])
    b.write_text("Ünïcödé text, and more of it. " * 3)
    return a, b


@torch.no_grad()
def _manual_nats(model, tokenizer, text: str, window: int) -> float:
    """The oracle: one document's stream, unbatched windows overlapping by one token."""
    end = tokenizer.eos_token_id
    ids = [end, *tokenizer(text, add_special_tokens=False)["input_ids"], end]
    nats = 0.0
    for s in range(0, len(ids) - 1, window - 1):
        w = torch.tensor([ids[s:s + window]])
        lp = F.log_softmax(model(input_ids=w).logits[0, :-1].float(), -1)
        nats -= float(lp.gather(-1, w[0, 1:, None]).sum())
    return nats


def test_bits_per_byte_of_the_token_stream(baseline_dir, tmp_path):
    """Each token predicted once over windows of the given length (or the model's), batched or
    not, its nats divided by ln 2 times a BLT's count for the same documents (bytes + 2 docs - 1)."""
    model, tokenizer = load_baseline(baseline_dir)
    a, b = _docs(tmp_path)
    for seq_len, batch in ((None, 4), (16, 1), (16, 4)):
        r = baseline_bpb(model, tokenizer, [a, b], seq_len=seq_len, batch_size=batch)
        for f, path in zip(r["files"], (a, b), strict=True):
            text = path.read_text()
            want = _manual_nats(model, tokenizer, text, seq_len or 64)
            assert f["nats"] == pytest.approx(want, rel=1e-5)
            assert f["bpb"] == pytest.approx(want / (math.log(2) * (len(text.encode()) + 1)), rel=1e-5)
        assert r["overall"]["bytes"] == len(a.read_bytes()) + len(b.read_bytes())
    with pytest.raises(ValueError, match="exceeds the baseline's 64 positions"):  # (an IndexError before)
        baseline_bpb(model, tokenizer, [a], seq_len=65)


def test_one_marker_between_documents_where_bos_is_eos(baseline_dir, tmp_path):
    """A GPT-2-style tokenizer (BOS = EOS = <|endoftext|>) reads documents as it was trained: one
    marker between them, never two in a row (which charged the baseline for a pair it never saw);
    the nats still divide by a BLT's count (bytes + 2 docs - 1)."""
    model, tokenizer = load_baseline(baseline_dir)
    docs = ["First document, fairly short.", "A second one follows it.", "And the third one ends."]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    end = tokenizer.eos_token_id
    ids = [end]
    for d in docs:
        ids += [*tokenizer(d, add_special_tokens=False)["input_ids"], end]
    want = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 15):
            w = torch.tensor([ids[s:s + 16]])
            want -= float(F.log_softmax(model(input_ids=w).logits[0, :-1].float(), -1).gather(-1, w[0, 1:, None]).sum())
    (f,) = baseline_bpb(model, tokenizer, [path], seq_len=16)["files"]
    n = sum(len(d.encode()) for d in docs)
    assert f["documents"] == 3
    assert f["tokens"] == len(ids) - 4
    assert f["nats"] == pytest.approx(want, rel=1e-5)
    assert f["bpb"] == pytest.approx(want / (math.log(2) * (n + 2 * 3 - 1)), rel=1e-5)


def test_cli_prints_both_and_refuses_bytes_it_cannot_read(baseline_dir, tmp_path, capsys):
    from bltkit.checkpoint import init_model, save_model
    from bltkit.cli import main
    from bltkit.presets import tiny

    save_model(init_model(tiny(), seed=0), tmp_path / "m")
    a, b = _docs(tmp_path)
    main(["eval", "bpb", str(a), str(b), "--model", str(tmp_path / "m"), "--device", "cpu", "--baseline",
          str(baseline_dir), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["baseline"]["overall"]["bytes"] == r["overall"]["bytes"]
    assert r["baseline"]["overall"]["bpb"] > 0
    main(["eval", "bpb", str(a), "--model", str(tmp_path / "m"), "--device", "cpu", "--baseline", str(baseline_dir)])
    assert "BLT / baseline" in capsys.readouterr().out
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(SystemExit):
        main(["eval", "bpb", str(tmp_path / "bad.txt"), "--model", str(tmp_path / "m"), "--device", "cpu",
              "--baseline", str(baseline_dir)])
    assert "not valid UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a window for no baseline: refused, not ignored
        main(["eval", "bpb", str(a), "--model", str(tmp_path / "m"), "--device", "cpu", "--baseline-seq-len", "16"])
    assert "give --baseline too" in capsys.readouterr().err
