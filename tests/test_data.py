"""Data loading: every format, the reference prompts, error messages that name file/line/field, tokenisation."""
from __future__ import annotations

import pytest
import torch
from helpers_cli import COMMONSENSE, SHARED, byte_tokenizer, shared_or_skip, write_jsonl

from loramix.data import IGNORE_INDEX, Encoder, Example, collate, get_template, load_examples, load_mixture
from loramix.data.tasks import TASKS, builtin_task, parse_commonsense
from loramix.errors import LoramixError
from loramix.runconfig import DatasetSpec


def test_alpaca_jsonl_and_json_array(tmp_path):
    recs = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "1+1", "output": "2"}]
    a = load_examples(DatasetSpec(path=str(write_jsonl(tmp_path / "a.jsonl", recs))))
    (tmp_path / "b.json").write_text(__import__("json").dumps(recs))
    b = load_examples(DatasetSpec(path=str(tmp_path / "b.json"), task="a"))
    assert a == b
    assert a[1].input == "1+1" and a[1].output == "2" and a[0].template == "alpaca" and a[0].task == "a"
    prompt = get_template("alpaca").prompt(a[1].instruction, a[1].input)
    assert prompt.endswith("### Instruction:\nAdd\n\n### Input:\n1+1\n\n### Response:\n")


def test_commonsense_shared_files():
    path = shared_or_skip(COMMONSENSE / "ARC-Easy" / "test.json")
    ex = load_examples(DatasetSpec(path=str(path), limit=5))
    assert ex[0].task == "arc-e" and len(ex) == 5
    assert ex[0].choices == tuple(f"the correct answer is answer{i}" for i in range(1, 5))
    assert ex[0].choices[ex[0].label] == ex[0].output
    wino = load_examples(DatasetSpec(path=str(COMMONSENSE / "winogrande" / "test.json"), limit=2))
    assert wino[0].task == "winogrande" and wino[0].choices[1].endswith("option2") and wino[0].label == 1


def test_commonsense_without_answer_format_is_an_error():
    with pytest.raises(LoramixError, match=r"f.json: record 3: instruction has no 'Answer format"):
        parse_commonsense({"instruction": "q?", "input": "", "output": "x", "answer": "x"}, "f.json: record 3", "t")


REFERENCE_RECORDS = {
    "arc-e": {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"},
    "obqa": {"question_stem": "Sun is a", "choices": {"text": ["star", "moon"], "label": ["A", "B"]}, "answerKey": "A"},
    "boolq": {"question": "is water wet", "answer": True, "passage": "..."},
    "piqa": {"goal": "open a jar", "sol1": "twist", "sol2": "hammer", "label": 0},
    "siqa": {"context": "Kim ate.", "question": "Why?", "answerA": "hungry", "answerB": "sad", "answerC": "tall",
             "label": "1"},
    "hellaswag": {"activity_label": "Cooking", "ctx": "A man cuts", "endings": ["a", "b", "c", "d"], "label": "2"},
    "winogrande": {"sentence": "Tom beat Bob, so _ won.", "option1": "Tom", "option2": "Bob", "answer": "1"},
}


@pytest.mark.parametrize("task", sorted(REFERENCE_RECORDS))
def test_reference_prompts(task, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [REFERENCE_RECORDS[task]])
    (ex,) = load_examples(DatasetSpec(path=str(path), task=task))
    assert ex.task == task and ex.template == "plain"
    assert ex.instruction.endswith("Correct solution:" if task == "piqa" else "\nAnswer:")
    assert get_template("plain").continuation(ex.output) == " " + ex.choices[ex.label]
    expected = {"arc-e": ("Please choose the correct answer to the question: Which is a gas? (A) ice (B) steam\n"
                          "Answer:", 1),
                "boolq": ("Please answer the following question with true or false: is water wet?\nAnswer:", 0),
                "siqa": ("Please choose the correct answer to the question.\nQuestion: Kim ate. Why?\n(A) hungry\n"
                         "(B) sad\n(C) tall\nAnswer:", 0),
                "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence."
                               "\nSentence: Tom beat Bob, so _ won.\n(A) Tom\n(B) Bob\nAnswer:", 0),
                "hellaswag": (None, 2), "piqa": (None, 0), "obqa": (None, 0)}[task]
    if expected[0]:
        assert ex.instruction == expected[0]
    assert ex.label == expected[1]


def test_builtin_tasks_cover_the_paper():
    assert {"arc-e", "arc-c", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande"} <= set(TASKS)
    with pytest.raises(LoramixError, match="did you mean 'boolq'"):
        builtin_task("boolqq")


def test_hellaswag_shared_file():
    path = shared_or_skip(SHARED / "data" / "hellaswag" / "hellaswag_val_subset.jsonl")
    ex = load_examples(DatasetSpec(path=str(path), task="hellaswag", limit=3))
    assert [e.choices for e in ex] == [("A", "B", "C", "D")] * 3 and ex[0].label == 3


def test_classification_formats(tmp_path):
    glob = write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    ex = load_examples(DatasetSpec(path=str(glob)))
    assert ex[0].choices == ("neg", "pos") and ex[0].label == 1 and ex[0].instruction.endswith("good\nAnswer:")
    mc = write_jsonl(tmp_path / "m.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "label": 1},
                                            {"question": "1+1?", "choices": ["2", "5"], "label": "2"}])
    ex = load_examples(DatasetSpec(path=str(mc)))
    assert ex[0].choices == ("A", "B") and ex[0].label == 1 and "(B) 4" in ex[0].instruction
    assert ex[1].label == 0  # a label equal to a choice text


def test_tsv_with_header_and_label_names(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\nnice film\t1\nawful\t0\n")
    ex = load_examples(DatasetSpec(path=str(path), label_names=["negative", "positive"], task="sst"))
    assert [e.output for e in ex] == ["positive", "negative"] and ex[0].task == "sst"
    assert ex[0].choices == ("negative", "positive")


def test_label_names_fix_the_candidates_of_word_labels(tmp_path):
    """A small file that lacks a label still scores over every label_names word, in their order."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "Le chat", "label": "French"}\n{"text": "The cat", "label": 0}\n')
    spec = DatasetSpec(path=str(path), label_names=["English", "French", "Spanish"])
    ex = load_examples(spec)
    assert [e.label for e in ex] == [1, 0] and ex[0].choices == ("English", "French", "Spanish")
    path.write_text('{"text": "Der Hund", "label": "German"}\n')
    with pytest.raises(LoramixError, match=r"d.jsonl:1: label 'German' is neither one of label_names"):
        load_examples(spec)


def test_tsv_shared_sst2_and_agnews():
    sst = shared_or_skip(SHARED / "data" / "sst2_agnews" / "SST-2" / "test.tsv")
    ex = load_examples(DatasetSpec(path=str(sst), label_names=["negative", "positive"], limit=4))
    assert len(ex) == 4 and ex[0].task == "sst-2" and ex[0].output == "positive"
    ag = load_examples(DatasetSpec(path=str(SHARED / "data" / "sst2_agnews" / "agnews" / "test.tsv"), limit=2))
    assert ag[0].choices == ("Business", "Sci/Tech", "Sports", "World") and ag[0].output == "Business"


@pytest.mark.parametrize("content,match", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"bad.jsonl:2: malformed JSON line"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"bad.jsonl:2: missing field 'output'"),
    ('{"instruction": "a", "output": 3}\n', r"bad.jsonl:1: field 'output' should be str"),
    ('\n\n', r"bad.jsonl: the dataset is empty"),
    ('[1, 2]', r"bad.jsonl: record 1: expected a JSON object"),
    ('{"foo": 1}\n', r"bad.jsonl:1: cannot tell the data format"),
])
def test_bad_files_name_file_line_and_field(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(LoramixError, match=match):
        load_examples(DatasetSpec(path=str(tmp_path / "bad.jsonl")))


def test_missing_file_and_bad_tsv(tmp_path):
    with pytest.raises(LoramixError, match="nope.jsonl: no such file"):
        load_examples(DatasetSpec(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.tsv").write_text("a\tb\nc\n")
    with pytest.raises(LoramixError, match=r"x.tsv:2: expected 2 tab-separated columns"):
        load_examples(DatasetSpec(path=str(tmp_path / "x.tsv"), header=True))


def test_hub_id_without_datasets_package_is_a_clear_error():
    pytest.importorskip("transformers")
    try:
        import datasets  # noqa: F401
        pytest.skip("the datasets package is installed; this test covers its absence")
    except ImportError:
        pass
    with pytest.raises(LoramixError, match="'datasets' package"):
        load_examples(DatasetSpec(path="someone/some_dataset"))


def test_mixture_samples_and_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(4)])
    mix = load_mixture([DatasetSpec(path=str(a), samples=3, task="ta"), DatasetSpec(path=str(b), weight=2.5)], seed=1)
    assert [e.task for e in mix].count("ta") == 3 and [e.task for e in mix].count("b") == 10
    assert len({e.instruction for e in mix if e.task == "ta"}) == 3
    assert load_mixture([DatasetSpec(path=str(a), samples=3, task="ta")], seed=1) == mix[:3]
    with pytest.raises(LoramixError, match="leave no examples"):
        load_mixture([DatasetSpec(path=str(a), weight=0.0)], seed=0)


def test_encoding_masks_prompt_and_appends_eos():
    tok = byte_tokenizer()
    ex = Example(instruction="Q?\nAnswer:", output="yes", template="plain")
    f = Encoder(tok).encode_train(ex)
    prompt = tok("Q?\nAnswer:")["input_ids"]
    assert f["input_ids"] == prompt + tok(" yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert f["labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert f["labels"][len(prompt):] == f["input_ids"][len(prompt):]
    g = Encoder(tok, train_on_inputs=True, add_eos=False, cutoff_len=5).encode_train(ex)
    assert g["labels"] == g["input_ids"] == prompt[:5]


def test_collate_right_pads_with_masks():
    b = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=3)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["input_ids"].dtype == torch.long


def test_chat_template_needs_one():
    with pytest.raises(LoramixError, match="template 'chat' needs a tokenizer with a chat template"):
        get_template("chat", byte_tokenizer())
    with pytest.raises(LoramixError, match="unknown template 'alpacca'"):
        get_template("alpacca")


def test_chat_template_renders_one_user_turn_without_a_second_bos():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    ex = Example(instruction="Hi", input="there", output="yo", template="chat")
    enc = Encoder(tok)
    assert enc.prompt_text(ex) == "<s>[user] Hi\n\nthere\n[assistant] "
    f = enc.encode_train(ex)
    assert f["input_ids"].count(tok.bos_token_id) == 1  # the template's own <s>; no second BOS added
    assert f["input_ids"][-1] == tok.eos_token_id
