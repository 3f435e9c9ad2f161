"""Tests of eellm_hf.trainer.data: tokenizer, bible corpus, loading, packing, splitting, DP sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eellm_hf.trainer import data as D

# Offline mode and a temporary HF_HOME come from tests/conftest.py; loaders get explicit cache dirs too.


@pytest.fixture(scope="module")
def chapters() -> list[str]:
    return D.bible_chapters()


@pytest.fixture(scope="module")
def tokenizer(chapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return D.train_bpe_tokenizer(chapters[:120], vocab_size=800, out_dir=out), out


def test_bible_text_from_installed_package(chapters, tmp_path):
    from eellm_hf import corpus

    verses = corpus.load_verses()
    assert len(verses) == 31102
    assert verses[0]["text"] == "In the beginning God created the heaven and the earth."
    assert len(D.bible_chapters(include_held_out=True)) == 1189
    assert chapters[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert chapters[-1].startswith("Hebrews 13\n")  # the held-out books (James .. Revelation) are left out
    assert not any(chapter.startswith(corpus.HELD_OUT_BOOKS) for chapter in chapters)
    text = D.bible_text()
    assert text.count("\n\n") == len(chapters) - 1 and len(text) > 3_800_000
    txt = D.write_bible_corpus(tmp_path / "kjv.txt")
    assert txt.read_text(encoding="utf-8") == text + "\n"
    jl = D.write_bible_corpus(tmp_path / "kjv.jsonl")
    first = json.loads(jl.open(encoding="utf-8").readline())
    assert first == {"text": chapters[0]}


def test_tokenizer_round_trip_special_tokens_and_reload(tokenizer, chapters):
    from transformers import AutoTokenizer

    tok, out = tokenizer
    assert len(tok) == 800
    assert tok.eos_token == D.EOS_TOKEN and tok.eos_token_id == 0 and tok.bos_token_id == 0
    assert tok.pad_token == D.PAD_TOKEN and tok.pad_token_id == 1
    reloaded = AutoTokenizer.from_pretrained(out)
    samples = [chapters[500][:300], "  Unseen wörds, émojis 😀 and\ttabs\n\nnewlines.", "x"]
    for text in samples:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == text
        assert D.EOS_TOKEN not in reloaded.convert_ids_to_tokens(ids)
    assert reloaded.eos_token_id == 0 and reloaded.pad_token_id == 1
    assert reloaded(D.EOS_TOKEN, add_special_tokens=False)["input_ids"] == [0]


def test_tokenizer_is_deterministic_and_accepts_files(tokenizer, chapters, tmp_path):
    tok, out = tokenizer
    again = D.train_bpe_tokenizer(chapters[:120], vocab_size=800)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chapters[:120]), encoding="utf-8")
    from_file = D.train_bpe_tokenizer([path], vocab_size=800, cache_dir=tmp_path / "cache")
    assert from_file.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError):
        D.train_bpe_tokenizer(["abc"], vocab_size=100)


def test_packing_lengths_and_labels(tokenizer, chapters):
    tok, _ = tokenizer
    docs = chapters[:10]
    flat = D.tokenize_documents(docs, tok)
    expected = []
    for doc in docs:
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert flat.tolist() == expected
    assert int((flat == tok.eos_token_id).sum()) == len(docs)

    seq_len = 32
    rows = D.pack_tokens(flat, seq_len)
    assert rows.shape == (len(flat) // (seq_len + 1), seq_len + 1)
    assert rows.reshape(-1).tolist() == expected[: rows.size]
    ds = D.PackedDataset(rows)
    assert ds.seq_len == seq_len and len(ds) == rows.shape[0]
    item = ds[3]
    assert item["input_ids"].shape == (seq_len,) and item["labels"].shape == (seq_len,)
    assert item["input_ids"].tolist() == rows[3, :-1].tolist()
    assert item["labels"].tolist() == rows[3, 1:].tolist()
    assert item["input_ids"][1:].tolist() == item["labels"][:-1].tolist()  # labels = next tokens
    batch = ds.batch([3, 0])
    assert batch["input_ids"].shape == (2, seq_len) and batch["input_ids"].dtype.is_floating_point is False
    assert batch["labels"][0].tolist() == item["labels"].tolist()

    from_texts = D.PackedDataset.from_texts(docs, tok, seq_len)
    np.testing.assert_array_equal(from_texts.rows, rows)
    assert D.pack_tokens(np.arange(10), 4).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert D.pack_tokens(np.arange(9), 4).shape == (1, 5)


def test_save_load_round_trip(tmp_path):
    ds = D.PackedDataset(np.arange(60).reshape(10, 6))
    train, val = D.train_val_split(ds, 3, seed=1)
    train.save(tmp_path / "train.npy")
    loaded = D.PackedDataset.load(tmp_path / "train.npy")
    assert len(loaded) == len(train)
    for i in range(len(train)):
        assert loaded[i]["labels"].tolist() == train[i]["labels"].tolist()


def test_shuffle_is_deterministic_and_epochs_differ():
    n = 50
    a = D.epoch_permutation(0, n, seed=3)
    assert sorted(a.tolist()) == list(range(n))
    np.testing.assert_array_equal(a, D.epoch_permutation(0, n, seed=3))
    assert not np.array_equal(a, D.epoch_permutation(1, n, seed=3))
    assert not np.array_equal(a, D.epoch_permutation(0, n, seed=4))
    np.testing.assert_array_equal(D.epoch_permutation(0, n, 3, shuffle=False), np.arange(n))

    gbs = 8
    batches = [D.global_batch_indices(s, gbs, n, seed=3) for s in range(20)]
    for s in (0, 7, 19):  # resumable: a function of the step alone
        np.testing.assert_array_equal(batches[s], D.global_batch_indices(s, gbs, n, seed=3))
    stream = np.concatenate(batches)  # 160 positions = 3 full epochs + 10
    for e in range(3):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n))  # each epoch sees every row once
        np.testing.assert_array_equal(epoch, D.epoch_permutation(e, n, seed=3))


def test_validation_split_disjoint_and_deterministic():
    ds = D.PackedDataset(np.arange(100 * 5).reshape(100, 5))
    train, val = D.train_val_split(ds, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    t_rows = {tuple(train.row(i)) for i in range(len(train))}
    v_rows = {tuple(val.row(i)) for i in range(len(val))}
    assert not t_rows & v_rows and len(t_rows | v_rows) == 100
    train2, val2 = D.train_val_split(ds, 0.1, seed=0)
    np.testing.assert_array_equal(val.indices, val2.indices)
    _, val3 = D.train_val_split(ds, 0.1, seed=1)
    assert not np.array_equal(val.indices, val3.indices)
    _, by_count = D.train_val_split(ds, 7, seed=0)
    assert len(by_count) == 7
    assert len(D.train_val_split(ds, 0.001, seed=0)[1]) == 1  # at least one row
    with pytest.raises(ValueError):
        D.train_val_split(ds, 100)


def test_load_txt_jsonl_parquet(tmp_path):
    import datasets

    cache = tmp_path / "cache"
    txt = tmp_path / "a.txt"
    txt.write_text("line one\nline two\n", encoding="utf-8")
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "json doc", "id": 1}) + "\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    pq = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"body": ["parquet doc"], "n": [3]}).to_parquet(str(pq))

    assert list(D.load_text_dataset(txt, cache_dir=cache)["text"]) == ["line one", "line two"]
    assert list(D.load_text_dataset(str(jl), cache_dir=cache)["text"]) == ["json doc", "second"]
    assert list(D.load_text_dataset([pq], text_field="body", cache_dir=cache)["text"]) == ["parquet doc"]
    mixed = D.load_text_dataset([txt, jl], cache_dir=cache)
    assert mixed.column_names == ["text"] and sorted(mixed["text"]) == sorted(
        ["line one", "line two", "json doc", "second"]
    )
    para = tmp_path / "p.txt"
    para.write_text("a\nb\n\nc\n", encoding="utf-8")
    assert list(D.load_text_dataset(para, sample_by="paragraph", cache_dir=cache)["text"]) == ["a\nb", "c\n"]
    with pytest.raises(KeyError):
        D.load_text_dataset([pq], cache_dir=cache)


def test_missing_files_are_named(tmp_path):
    present = tmp_path / "ok.txt"
    present.write_text("x\n")
    with pytest.raises(FileNotFoundError) as err:
        D.load_text_dataset([present, tmp_path / "nope.jsonl", str(tmp_path / "gone.parquet")], cache_dir=tmp_path)
    assert "nope.jsonl" in str(err.value) and "gone.parquet" in str(err.value) and "ok.txt" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        D.load_text_dataset(tmp_path / "missing.txt", cache_dir=tmp_path)
