"""Scoring: label-token and log-likelihood predictions, padding invariance, adapters of both kinds, bad adapters."""
from __future__ import annotations

import json

import pytest
import torch
from helpers_cli import COMMONSENSE, byte_tokenizer, shared_or_skip, tiny_llama_dir

import loramix
from loramix.data import Encoder, Example, load_examples
from loramix.errors import LoramixError
from loramix.evaluation.accuracy import format_table, predict, score, with_average
from loramix.io.base_model import load_base_model
from loramix.loading import attach_adapter
from loramix.runconfig import DatasetSpec, ModelSpec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("eval") / "model")


def _base(model_dir):
    return load_base_model(ModelSpec(name_or_path=str(model_dir))).eval()


EXAMPLES = [
    Example(instruction="Is 4 even?\nAnswer:", output="yes", choices=("yes", "no"), label=0, task="a"),
    Example(instruction="Pick one, quickly please\nAnswer:", output="B", choices=("A", "B", "C"), label=1, task="b"),
    Example(instruction="Colour?\nAnswer:", output="red", choices=("red", "green", "blue"), label=2, task="b"),
]


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_predictions_match_unbatched_hand_computation(model_dir):
    model, tok = _base(model_dir), byte_tokenizer()
    enc = Encoder(tok)
    preds = predict(model, enc, EXAMPLES, batch_size=2)
    for p in preds:
        prompt = enc.prompt_ids(p.example)
        cands = [enc.answer_ids(p.example, c) for c in p.example.choices]
        # byte tokens: every candidate is " " + letters, so the shared prefix is the space
        assert all(c[0] == cands[0][0] for c in cands)
        lp = _logprobs(model, prompt + cands[0][:1])[-1]
        assert p.label_pred == int(torch.argmax(torch.stack([lp[c[1]] for c in cands])))
        lls = []
        for c in cands:
            full = _logprobs(model, prompt + c)
            lls.append(sum(float(full[len(prompt) + j - 1, c[j]]) for j in range(1, len(c))))
        assert p.loglik == pytest.approx(lls, abs=1e-4)
        assert p.loglik_pred == max(range(len(lls)), key=lls.__getitem__)


def test_padding_does_not_change_scores(model_dir):
    model, enc = _base(model_dir), Encoder(byte_tokenizer())
    one = predict(model, enc, EXAMPLES, batch_size=1)
    many = predict(model, enc, EXAMPLES, batch_size=8)
    for a, b in zip(one, many):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-4) and a.label_pred == b.label_pred


def test_score_table_and_average(model_dir):
    res = with_average(score(_base(model_dir), Encoder(byte_tokenizer()), EXAMPLES))
    assert set(res) == {"a", "b", "average"} and res["b"]["n"] == 2 and res["average"]["n"] == 3
    assert all(0 <= r["label_acc"] <= 1 for r in res.values())
    table = format_table(res)
    assert "label acc" in table and "average" in table


def test_shared_commonsense_slice_scores(model_dir):
    path = shared_or_skip(COMMONSENSE / "boolq" / "test.json")
    ex = load_examples(DatasetSpec(path=str(path), limit=6))
    res = score(_base(model_dir), Encoder(byte_tokenizer()), ex, max_len=512)
    assert res["boolq"]["n"] == 6


def test_no_scored_examples_is_an_error(model_dir):
    with pytest.raises(LoramixError, match="no scored examples"):
        score(_base(model_dir), Encoder(byte_tokenizer()), [Example(instruction="x", output="y")])


def _perturbed(params):
    torch.manual_seed(3)
    with torch.no_grad():
        for _, p in params:
            p.add_(torch.randn_like(p) * 0.3)


def test_mixlora_and_peft_adapters_load_for_eval(model_dir, tmp_path):
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    bare = _base(model_dir)(input_ids=ids).logits

    mix = loramix.get_mixlora_model(_base(model_dir), loramix.MixLoraConfig(r=2, lora_alpha=4, num_experts=3, top_k=2))
    _perturbed(list(mix.trainable_parameters()))
    mix.eval()
    mix.save_pretrained(tmp_path / "mix")
    loaded = attach_adapter(_base(model_dir), str(tmp_path / "mix"))
    assert torch.allclose(loaded(input_ids=ids).logits, mix(input_ids=ids).logits, atol=1e-5)
    assert not torch.allclose(loaded(input_ids=ids).logits, bare, atol=1e-3)

    from peft import LoraConfig, get_peft_model
    lora = get_peft_model(_base(model_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    lora.eval()
    lora.save_pretrained(tmp_path / "lora")
    loaded = attach_adapter(_base(model_dir), str(tmp_path / "lora"))
    assert torch.allclose(loaded(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_incompatible_or_missing_adapter(model_dir, tmp_path):
    other = tiny_llama_dir(tmp_path / "wide", hidden=64)
    mix = loramix.get_mixlora_model(_base(other), loramix.MixLoraConfig(r=2, num_experts=2, top_k=1))
    mix.save_pretrained(tmp_path / "wide-adapter")
    with pytest.raises(LoramixError, match="does not fit this model"):
        attach_adapter(_base(model_dir), str(tmp_path / "wide-adapter"))
    with pytest.raises(LoramixError, match="no such adapter folder"):
        attach_adapter(_base(model_dir), str(tmp_path / "nothing"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(LoramixError, match="peft_type 'IA3' is not supported"):
        attach_adapter(_base(model_dir), str(tmp_path / "odd"))
