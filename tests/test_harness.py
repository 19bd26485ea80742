"""bltkit.eval.harness: the lm-evaluation-harness interface (needs the `eval` extra), on a tiny model
and local tasks only (no network)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance

from bltkit.bytes import encode
from bltkit.checkpoint import save_model
from bltkit.eval.harness import BLTLM
from bltkit.generate import Generator

PAIRS = [("The cat sat on the", " mat"), ("", "Hello"), ("Paris is the capital of", " France"),
         ("Paris is the capital of", " Spain"), ("naïve café", " ünïcödé"), ("x" * 40, "y")]


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@torch.no_grad()
def _forward_score(model, context: str, continuation: str) -> tuple[float, bool]:
    """The oracle: one unbatched forward over BOS + context + continuation."""
    ctx, cont = encode(context, bos=True, eos=False), encode(continuation, bos=False, eos=False)
    logp = F.log_softmax(model(torch.tensor([ctx + cont]))[0].float(), -1)[len(ctx) - 1:-1]
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_equals_one_forward_per_request(tiny_model):
    """Batched (right-padded, sorted by length) or one at a time, each request's log-probability
    equals one forward of its own within 1e-5 (fp32 sums in another order); is_greedy is exact,
    and true for the model's own greedy continuation."""
    want = [_forward_score(tiny_model, c, x) for c, x in PAIRS]
    for batch in (1, 4):
        got = BLTLM(tiny_model, batch_size=batch).loglikelihood(_requests("loglikelihood", PAIRS))
        for (lp, greedy), (lp_want, greedy_want) in zip(got, want, strict=True):
            assert lp == pytest.approx(lp_want, abs=1e-5)
            assert greedy == greedy_want
    # the model's own greedy bytes (as ids: a random model's bytes need not be UTF-8 text)
    greedy = Generator(tiny_model).generate_ids(["The cat"], 3, stop_at_eos=False)[0]
    ((_, is_greedy),) = BLTLM(tiny_model)._score([(encode("The cat", bos=False, eos=False), greedy)])
    assert is_greedy


def test_a_long_context_keeps_its_last_bytes(make_tiny_model):
    """A context past the model's length is cut on the left (after BOS), counted and reported."""
    model = make_tiny_model()
    model.config = dataclasses.replace(model.config, max_bytes=24)
    lm = BLTLM(model)
    context, cont = "abcdefghijklmnopqrstuvwxyz0123456789", " end"
    ((lp, _),) = lm.loglikelihood(_requests("loglikelihood", [(context, cont)]))
    kept = context[len(context) - (24 - 1 - len(cont)):]
    assert lp == pytest.approx(_forward_score(model, kept, cont)[0], abs=1e-5)


def test_rolling_scores_each_byte_once(make_tiny_model):
    """A document that fits is one forward (every byte after BOS scored); a longer one is cut into
    the harness's rolling windows (context_len=1): each scores max_length - 2 bytes once after BOS
    and, past the first, the bytes before them that fill its max_length - 2 inputs as context (one,
    or more in the last window), none of which is cut."""
    model = make_tiny_model()
    doc = "Rolling windows score every byte of a document exactly once."
    ((lp,),) = [BLTLM(model).loglikelihood_rolling(_requests("loglikelihood_rolling", [(doc,)]))]
    assert lp == pytest.approx(_forward_score(model, "", doc)[0], abs=1e-4)
    short = make_tiny_model()
    short.config = dataclasses.replace(short.config, max_bytes=16)
    (lp_short,) = BLTLM(short).loglikelihood_rolling(_requests("loglikelihood_rolling", [(doc,)]))
    n = len(doc.encode())
    windows = [(doc.encode()[max(0, e - 15):s], doc.encode()[s:e]) for s, e in
               ((s, min(s + 14, n)) for s in range(0, n, 14))]
    want = sum(_forward_score(model, c.decode(), x.decode())[0] for c, x in windows)
    assert lp_short == pytest.approx(want, abs=1e-4)
    assert lp_short != pytest.approx(lp, abs=1e-3)  # less context: another sum


def test_generate_until_is_the_generator(tiny_model):
    """generate_until gives Generator.generate's text: greedy, stopping at `until` (cut), or after
    max_gen_toks bytes; requests with other settings in one call each get their own."""
    gen = Generator(tiny_model)
    free = gen.generate("Once upon", 24)[0]
    stop = chr(next(b for b in free[4:] if b < 0x80))  # an ASCII byte the free text writes
    args = [("Once upon", {"until": [stop], "max_gen_toks": 24}), ("Once upon", {"until": [], "max_gen_toks": 5}),
            ("Twice", {"until": "\n\n", "max_gen_toks": 7})]
    got = BLTLM(tiny_model, batch_size=2).generate_until(_requests("generate_until", args))
    want = [gen.generate(p, kw["max_gen_toks"], stop=[kw["until"]] if isinstance(kw["until"], str) else kw["until"]
                         or None)[0].decode("utf-8", errors="replace") for p, kw in args]
    assert got == want
    assert stop.encode() not in got[0].encode()
    text = free.decode("utf-8", errors="replace")  # (like with like: text, not its bytes against free's)
    assert text.startswith(got[0])
    assert len(got[0]) < len(text)  # the stop string ended it


def test_sampled_repeats_differ(tiny_model):
    """The harness asks a sampled request k times (repeats): each copy draws its own sample (seed +
    k), where a seed keyed by the prompt alone gave k copies of one; greedy copies stay equal."""
    kw = {"until": [], "max_gen_toks": 16, "do_sample": True, "temperature": 1.0}
    lm = BLTLM(tiny_model, batch_size=4)
    got = lm.generate_until(_requests("generate_until", [("Once upon", kw)] * 4))
    assert len(set(got)) > 1
    assert lm.generate_until(_requests("generate_until", [("Once upon", kw)] * 4)) == got  # reproducible
    greedy = lm.generate_until(_requests("generate_until", [("Once upon", {"until": [], "max_gen_toks": 16})] * 3))
    assert len(set(greedy)) == 1


def test_noise_perturbs_the_contexts_only(tiny_model):
    """With noise, a request is scored as if its context had been noised by hand (the continuation
    as it is), and generation reads the noised context; a bad spec is refused before loading."""
    from bltkit.eval.noise import apply

    lm = BLTLM(tiny_model, noise="randomcase", noise_seed=3)
    got = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    want = [_forward_score(tiny_model, apply(c, "randomcase", 3), x) for c, x in PAIRS]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-5)
    assert got != BLTLM(tiny_model).loglikelihood(_requests("loglikelihood", PAIRS))
    (text,) = lm.generate_until(_requests("generate_until", [("Once upon", {"max_gen_toks": 6})]))
    assert text == Generator(tiny_model).generate(apply("Once upon", "randomcase", 3), 6)[0].decode(
        "utf-8", errors="replace")
    with pytest.raises(ValueError, match="unknown noise"):
        BLTLM("/nonexistent", noise="blur")


def test_what_does_not_fit_or_cannot_apply(make_tiny_model, tiny_model, capsys):
    """A generation longer than the model is shortened to fit (reported), an answer longer than
    the model keeps its last bytes as a context does, a rolling task's own window cuts are not
    reported as the user's, noise on a rolling task is refused (the harness would divide by the
    clean length), sampled generation takes the seed, and a given dtype leaves the caller's model."""
    model = make_tiny_model()
    model.config = dataclasses.replace(model.config, max_bytes=24)
    lm = BLTLM(model)
    (text,) = lm.generate_until(_requests("generate_until", [("Once", {"max_gen_toks": 1000})]))
    assert "asked for more bytes than the model's 24 allow: generated 22" in capsys.readouterr().out
    assert text == Generator(model).generate(b"e", 22)[0].decode("utf-8", errors="replace")  # Once's last byte
    ((lp, _),) = lm.loglikelihood(_requests("loglikelihood", [("ctx", "z" * 30)]))
    assert lp == pytest.approx(_forward_score(model, "", "z" * 23)[0], abs=1e-5)
    assert "1 request(s) longer than the model's 24 bytes" in capsys.readouterr().out
    lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [("a document of sixty bytes or so, " * 2,)]))
    assert "longer than the model" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="run it without --noise"):
        BLTLM(model, noise="drop").loglikelihood_rolling(_requests("loglikelihood_rolling", [("text",)]))
    sampled = [BLTLM(tiny_model, noise_seed=s).generate_until(_requests("generate_until", [
        ("Once", {"max_gen_toks": 12, "do_sample": True, "temperature": 1.0})]))[0] for s in (1, 2, 1)]
    assert sampled[0] == sampled[2] != sampled[1]
    BLTLM(tiny_model, dtype="bf16")
    assert next(tiny_model.parameters()).dtype == torch.float32
    for kw, match in (({"dtype": "int8"}, "dtype 'int8'"), ({"batch_size": "auto"}, "whole numbers")):
        with pytest.raises(ValueError, match=match):
            BLTLM(tiny_model, **kw)


def test_cli_eval_tasks_on_a_local_task(make_tiny_model, tmp_path, capsys, monkeypatch):
    """`blt eval tasks` runs the harness end to end on task YAMLs of a local folder (a
    multiple-choice and a generation task over a local JSON lines file), offline."""
    import datasets

    from bltkit.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    save_model(make_tiny_model(), tmp_path / "m")
    rows = [{"q": "Paris is the capital of", "choices": [" France", " Spain"], "label": 0},
            {"q": "The cat sat on the", "choices": [" mat", " sky"], "label": 1}]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'toy.jsonl'}\ntest_split: test\n"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text("task: toy_mc\n" + data + 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\n'
                                   'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
                                   "metric_list:\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text("task: toy_gen\n" + data + 'output_type: generate_until\ndoc_to_text: "{{q}}"\n'
                                    'doc_to_target: "{{choices[0]}}"\ngeneration_kwargs:\n  until: ["."]\n'
                                    "  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n")
    out = tmp_path / "results.json"
    main(["eval", "tasks", "--tasks", "toy_mc,toy_gen", "--model", str(tmp_path / "m"), "--include-path",
          str(tasks), "--device", "cpu", "--output", str(out)])
    assert "toy_mc" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert results["toy_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert results["toy_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    with pytest.raises(SystemExit):
        main(["eval", "tasks", "--tasks", "no_such_task", "--model", str(tmp_path / "m"), "--include-path",
              str(tasks), "--device", "cpu"])
    assert "unknown task(s) no_such_task" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before the evaluation, not after it
        main(["eval", "tasks", "--tasks", "toy_mc", "--model", str(tmp_path / "m"), "--output", str(tmp_path)])
    assert "give a file in an existing folder" in capsys.readouterr().err
