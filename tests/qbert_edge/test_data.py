"""Data loading: the built-in Rotten Tomatoes split, user CSV/TSV/JSONL files and their errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qbert_edge.data import Dataset, Example, batch_order, length_grouped_order, load_data, subsets, torch_batches
from qbert_edge.errors import QbertEdgeError

# --------------------------------------------------------------------------- rt


def test_rt_is_all_8530_rows_and_balanced():
    data = load_data("rt")
    assert len(data) == 8530
    assert data.labels == ("negative", "positive")
    assert data.counts() == {"negative": 4265, "positive": 4265}


def test_rt_split_is_stratified_disjoint_and_complete():
    train, dev = load_data("rt:train"), load_data("rt:dev")
    assert (len(train), len(dev)) == (7676, 854)
    assert dev.counts() == {"negative": 427, "positive": 427}
    assert train.counts() == {"negative": 3838, "positive": 3838}
    assert not set(train.texts) & set(dev.texts)
    assert sorted(train.texts + dev.texts) == sorted(load_data("rt").texts)


def test_rt_split_does_not_depend_on_hash_randomization():
    code = "from qbert_edge.data import load_data; d = load_data('rt:dev'); print(d.texts[0], d.texts[-1], len(d))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "PATH": ""}, capture_output=True, text=True, check=True
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().startswith(load_data("rt:dev").texts[0])


def test_rt_maps_to_model_labels_by_name():
    dev = load_data("rt:dev")
    swapped = load_data("rt:dev", labels=["positive", "negative"])
    assert swapped.labels == ("positive", "negative")
    assert [1 - i for i in dev.label_ids] == swapped.label_ids


def test_rt_unknown_split():
    with pytest.raises(QbertEdgeError, match="rt:test: unknown split"):
        load_data("rt:test")


# --------------------------------------------------------------------------- user files


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_with_string_labels_gets_sorted_label_set(tmp_path):
    path = _write(tmp_path, "d.csv", 'text,label\n"good, really",pos\nbad,neg\nfine,pos\n')
    data = load_data(path)
    assert data.labels == ("neg", "pos")
    assert data.texts == ["good, really", "bad", "fine"]
    assert data.label_ids == [1, 0, 1]
    assert data.text_pairs is None


def test_csv_with_int_labels_keeps_ids(tmp_path):
    data = load_data(_write(tmp_path, "d.csv", "label,text\n2,a\n0,b\n"))
    assert data.labels == ("0", "1", "2")
    assert data.label_ids == [2, 0]


def test_tsv_with_text_pair(tmp_path):
    data = load_data(_write(tmp_path, "d.tsv", "text\ttext_pair\tlabel\na b\tc d\tyes\ne\tf\tno\n"))
    assert data.examples == (Example("a b", 1, "c d"), Example("e", 0, "f"))
    assert data.text_pairs == ["c d", "f"]


def test_jsonl_int_and_string_labels(tmp_path):
    lines = [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {}, {"text": "c", "label": "1"}]
    text = "\n".join("" if not r else json.dumps(r) for r in lines) + "\n"
    data = load_data(_write(tmp_path, "d.jsonl", text))
    assert data.labels == ("0", "1")
    assert data.label_ids == [1, 0, 1]


def test_crlf_and_unicode_line_separators(tmp_path):
    csv_data = load_data(_write(tmp_path, "d.csv", "text,label\r\none\u2028two,a\r\nthree,b\r\n"))
    assert csv_data.texts == ["one\u2028two", "three"]
    jsonl = '{"text": "x\u2028y", "label": "a"}\r\n{"text": "", "label": "a"}\r\n'
    with pytest.raises(QbertEdgeError, match="d.jsonl:2: empty text"):
        load_data(_write(tmp_path, "d.jsonl", jsonl))
    with pytest.raises(QbertEdgeError, match="d.csv:3: empty text"):
        load_data(_write(tmp_path, "d.csv", "text,label\r\na\u2028b,1\r\n,0\r\n"))


def test_model_labels_map_names_and_ids(tmp_path):
    path = _write(tmp_path, "d.csv", "text,label\na,positive\nb,0\nc,negative\n")
    data = load_data(path, labels=("negative", "positive"))
    assert data.labels == ("negative", "positive")
    assert data.label_ids == [1, 0, 0]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("d.csv", "text,label\na,1\n,0\n", "d.csv:3: empty text"),
        ("d.csv", "text,label\na,1\nb,0\n   ,1\n", "d.csv:4: empty text"),
        ("d.csv", 'text,label\n"two\nlines",1\n"",0\n', "d.csv:4: empty text"),
        ("d.csv", "text,lab\na,1\n", "d.csv:1: missing column 'label'"),
        ("d.csv", "label\n1\n", "d.csv:1: missing column 'text'"),
        ("d.csv", "text,label\na,1\nb\n", "d.csv:3: 1 fields, header has 2"),
        ("d.csv", "text,label\na,\n", "d.csv:2: empty label"),
        ("d.tsv", "text\tlabel\na\t1\n\t1\n", "d.tsv:3: empty text"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{"label": 1}\n', "d.jsonl:2: missing field 'text'"),
        ("d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "", "label": 0}\n', "d.jsonl:3: empty text"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "a", "label": 1\n', "d.jsonl:2: not valid JSON"),
        ("d.jsonl", '{"text": "a", "label": true}\n', "d.jsonl:1: label must be a string or an integer"),
        ("d.jsonl", '{"text": "a", "label": 1, "text_pair": "b"}\n{"text": "c", "label": 0}\n',
         "d.jsonl:2: missing text_pair"),
        ("d.csv", "text,label\n", "d.csv: no examples"),
        ("d.csv", "", "d.csv: empty file"),
        ("d.txt", "text,label\na,1\n", "unknown data file type '.txt'"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, text, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(QbertEdgeError) as info:
        load_data(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("label", ["maybe", "2", "-1"])
def test_unknown_label_with_model_labels(tmp_path, label):
    path = _write(tmp_path, "d.csv", f"text,label\na,negative\nb,{label}\n")
    with pytest.raises(QbertEdgeError, match=rf"d.csv:3: unknown label '{label}' \(model labels: negative, positive\)"):
        load_data(path, labels=["negative", "positive"])


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(QbertEdgeError, match=r"nope.csv: no such data file$"):
        load_data(str(tmp_path / "nope.csv"))


def test_dataset_validates_label_ids():
    with pytest.raises(QbertEdgeError, match="label id 2 out of range"):
        Dataset("x", (Example("a", 2),), ("a", "b"))


# --------------------------------------------------------------------------- subsets and batches


def _numbered(n: int) -> Dataset:
    return Dataset("n", tuple(Example(f"t{i}", i % 2) for i in range(n)), ("a", "b"))


def test_subsets_are_seeded_sized_and_distinct():
    data = _numbered(100)
    first = subsets(data, k=4, fraction=0.1, seed=3)
    assert [len(s) for s in first] == [10] * 4
    assert first == subsets(data, k=4, fraction=0.1, seed=3)
    assert [s.texts for s in first] != [s.texts for s in subsets(data, k=4, fraction=0.1, seed=4)]
    assert len({tuple(s.texts) for s in first}) == 4
    for s in first:
        assert len(set(s.texts)) == 10 and set(s.texts) <= set(data.texts)


def test_subsets_reject_bad_arguments():
    with pytest.raises(QbertEdgeError, match="fraction"):
        subsets(_numbered(10), k=2, fraction=0.0, seed=0)
    with pytest.raises(QbertEdgeError, match="at least one subset"):
        subsets(_numbered(10), k=0, fraction=0.5, seed=0)


def test_torch_batches_shapes_and_shuffle(tiny_tokenizer, tiny_texts):
    data = Dataset("tiny", tuple(Example(t, y) for t, y in tiny_texts), ("neg", "pos"))
    batches = list(torch_batches(data, tiny_tokenizer, batch_size=3, max_length=16))
    assert [len(b["labels"]) for b in batches] == [3, 3, 2]
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert all(str(t.dtype) == "torch.int64" for t in b.values())
    assert b["labels"].tolist() == [y for _, y in tiny_texts[:3]]
    assert b["input_ids"][0, 0].item() == tiny_tokenizer.token_to_id("[CLS]")

    def first_tokens(shuffle, seed=0):
        batches = torch_batches(data, tiny_tokenizer, 3, 16, shuffle=shuffle, seed=seed)
        return [int(t) for b in batches for t in b["input_ids"][:, 1]]

    plain = first_tokens(shuffle=False)
    assert first_tokens(True, seed=1) == first_tokens(True, seed=1)
    assert sorted(first_tokens(True, seed=1)) == sorted(plain)
    assert len({tuple(first_tokens(True, seed=s)) for s in range(4)} | {tuple(plain)}) > 2


def test_length_grouped_order_is_a_seeded_permutation_of_similar_length_batches():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(3, 64) for _ in range(1000)]
    order = length_grouped_order(lengths, 32, seed=5, window=10)
    assert sorted(order) == list(range(1000)) and order == length_grouped_order(lengths, 32, seed=5, window=10)
    assert order != length_grouped_order(lengths, 32, seed=6, window=10)

    def padding(order):  # padded tokens when each batch is padded to its longest text
        cuts = [order[i : i + 32] for i in range(0, len(order), 32)]
        return sum(len(c) * max(lengths[r] for r in c) - sum(lengths[r] for r in c) for c in cuts)

    assert padding(order) < padding(batch_order(1000, True, 5)) / 5
    # the short batch (1000 = 31 x 32 + 8) stays last, so cutting every 32 gives the grouped batches
    spans = [max(lengths[r] for r in order[i : i + 32]) - min(lengths[r] for r in order[i : i + 32]) for i in range(0, 992, 32)]
    assert sum(span > 12 for span in spans) <= 1 and len(order[992:]) == 8  # 1000 = 3 windows of 320 + 40
    # window 1: sorted within each batch only, so the batches hold the plain shuffle's examples
    assert sorted(map(sorted, (length_grouped_order(lengths, 32, 5, window=1)[i : i + 32] for i in range(0, 992, 32)))) == \
        sorted(map(sorted, (batch_order(1000, True, 5)[i : i + 32] for i in range(0, 992, 32))))
    with pytest.raises(QbertEdgeError, match="at least 1"):
        length_grouped_order(lengths, 0, seed=0)


def test_torch_batches_grouped_by_length_pad_less(tiny_tokenizer):
    texts = ["good", "the film is a long and winding road to nowhere at all", "fine", "bad movie",
             "a story about people who talk and talk for a long time", "ok"] * 4
    data = Dataset("mixed", tuple(Example(t, i % 2) for i, t in enumerate(texts)), ("neg", "pos"))

    def padded(group):
        batches = list(torch_batches(data, tiny_tokenizer, 4, 32, shuffle=True, seed=3, group_by_length=group))
        assert sorted(int(t) for b in batches for t in b["labels"]) == sorted(e.label for e in data.examples)
        return sum(b["input_ids"].numel() for b in batches)

    assert padded(True) < 0.8 * padded(False)


def test_torch_batches_truncates_to_max_length(tiny_tokenizer, caplog):
    data = Dataset("long", (Example("the film " * 20, 0), Example("good", 1)), ("neg", "pos"))
    (batch,) = torch_batches(data, tiny_tokenizer, batch_size=2, max_length=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert "1 of 2 texts truncated to 8 tokens" in caplog.text


def test_data_module_does_not_import_torch():
    code = "import sys, qbert_edge.data, qbert_edge.runtime.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_token_counts_match_what_encode_gives_texts_and_pairs(tiny_tokenizer):
    from qbert_edge.runtime.text import encode, token_counts

    texts = ["good film", "the film is a long and winding road", "ok"]
    pairs = ["bad", "fine fine fine", "the end of it all"]
    for p in (None, pairs):
        for cut in (64, 6):
            want = encode(tiny_tokenizer, texts, p, max_length=cut).arrays["attention_mask"].sum(1).tolist()
            assert token_counts(tiny_tokenizer, texts, p, cut) == want
