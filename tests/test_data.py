"""The triage data set: generator determinism, split design, loader errors, answer parsing, hashing."""
import json
import re

import pytest

from qlora_nb import data, datagen, paths

GOOD = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                     {"role": "assistant", "content": '{"category": "billing", "priority": "low", "summary": "x."}'}]}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def bad_row(**change):
    row = json.loads(json.dumps(GOOD))
    for key, value in change.items():
        if key == "answer":
            row["messages"][-1]["content"] = value
        else:
            row[key] = value
    return json.dumps(row)


# --- the committed files -----------------------------------------------------------------------------

def test_generator_reproduces_the_committed_files_byte_for_byte(tmp_path):
    datagen.write_all(tmp_path)
    committed = paths.repo_root() / "data"
    for rel in ["triage/train.jsonl", "triage/validation.jsonl", "triage/test.jsonl",
                "canary/general.txt", "canary/questions.jsonl"]:
        assert (tmp_path / rel).read_bytes() == (committed / rel).read_bytes(), f"{rel} differs: rerun datagen"


def test_split_sizes_and_balanced_categories():
    for split, (n, _) in datagen.SPLITS.items():
        rows = data.load_triage(split)
        assert len(rows) == n
        counts = {c: 0 for c in data.CATEGORIES}
        for r in rows:
            counts[data.parse_answer(r["messages"][-1]["content"])["category"]] += 1
        assert set(counts.values()) == {n // len(data.CATEGORIES)}, counts
        priorities = {data.parse_answer(r["messages"][-1]["content"])["priority"] for r in rows}
        assert priorities == set(data.PRIORITIES)


def _messages(split):
    return [r["messages"][1]["content"] for r in data.load_triage(split)]


def test_no_message_appears_in_two_splits_or_twice():
    train, val, test = (_messages(s) for s in ("train", "validation", "test"))
    for msgs in (train, val, test):
        assert len(set(msgs)) == len(msgs)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)


def test_test_situations_products_and_modifier_sentences_never_occur_in_train():
    train_rows = data.load_triage("train") + data.load_triage("validation")
    test_rows = data.load_triage("test")
    train_text = " ".join(_messages("train") + _messages("validation")).lower()
    test_text = " ".join(_messages("test")).lower()
    for product in datagen.PRODUCTS["test"]:
        assert product.lower() not in train_text, product
    for product in datagen.PRODUCTS["test"]:  # "label printer" is a test product, "printer" a train one
        test_text = test_text.replace(product.lower(), " ")
    for product in datagen.PRODUCTS["train"]:
        assert not re.search(rf"\b{re.escape(product.lower())}\b", test_text), product
    assert not {r["meta"]["situation"] for r in train_rows} & {r["meta"]["situation"] for r in test_rows}
    assert {r["meta"]["pool"] for r in test_rows} == {"test"}
    assert {r["meta"]["pool"] for r in train_rows} == {"train"}


# --- loader errors -----------------------------------------------------------------------------------

def test_a_non_json_line_is_named_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", [json.dumps(GOOD), "", "{not json"])
    with pytest.raises(data.DataError, match=r"rows\.jsonl, line 3: not valid JSON"):
        data.read_jsonl(path)


@pytest.mark.parametrize("line, message", [
    (json.dumps({"text": "hi"}), "missing field 'messages'"),
    (json.dumps({"messages": [{"content": "x"}]}), r"messages\[0\] is missing field 'role'"),
    (json.dumps({"messages": [{"role": "user"}]}), r"messages\[0\] is missing field 'content'"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "ending with the 'assistant' answer"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "x"}]}),
     "alternating"),
    (bad_row(answer="I think it's billing"), "not one JSON object"),
    (bad_row(answer='{"category": "refunds", "priority": "low", "summary": "x"}'), "unknown category 'refunds'"),
    (bad_row(answer='{"category": "billing", "priority": "asap", "summary": "x"}'), "unknown priority 'asap'"),
])
def test_malformed_rows_name_the_line_and_the_problem(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), line])
    with pytest.raises(data.DataError, match="bad.jsonl, line 2: .*" + message):
        data.read_jsonl(path)


def test_non_triage_chat_rows_pass_with_triage_false(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [bad_row(answer="plain text answer")])
    assert len(data.read_jsonl(path, triage=False)) == 1


def test_an_empty_split_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_NB_DATA", str(tmp_path))
    datagen.write_all(tmp_path)
    (tmp_path / "triage" / "validation.jsonl").write_text("\n")
    with pytest.raises(data.DataError, match="validation split is empty"):
        data.load_triage("validation")
    with pytest.raises(data.DataError, match="choose one of train, validation, test"):
        data.load_triage("dev")


def test_missing_data_folder_is_regenerated(tmp_path, monkeypatch):
    """What a pip install on Colab sees: no data/ folder, so the loader writes it from the generator."""
    monkeypatch.setenv("QLORA_NB_DATA", str(tmp_path / "fresh"))
    rows = data.load_triage("test")
    monkeypatch.delenv("QLORA_NB_DATA")
    assert rows == data.load_triage("test")
    assert data.load_canary()["questions"]


# --- answers and hashes ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, ok", [
    ('{"category": "billing", "priority": "low", "summary": "One sentence."}', True),
    ('\n  {"summary": "s", "priority": "high", "category": "returns"}  \n', True),
    ('{"category": "invented", "priority": "low", "summary": "s"}', True),   # valid JSON, wrong label
    ('{"category": "billing", "priority": "low"}', False),
    ('{"category": "billing", "priority": "low", "summary": "s", "extra": 1}', False),
    ('{"category": "billing", "priority": 3, "summary": "s"}', False),
    ('Answer: {"category": "billing", "priority": "low", "summary": "s"}', False),
    ('{"category": "billing", "priority": "low", "summary": "s"} and more', False),
    ('```json\n{"category": "billing", "priority": "low", "summary": "s"}\n```', False),
    ('["billing", "low", "s"]', False),
    ("", False),
    (None, False),
])
def test_parse_answer(text, ok):
    assert (data.parse_answer(text) is not None) == ok


def test_every_reference_answer_parses_to_its_labels():
    for split in data.SPLITS:
        for row in data.load_triage(split):
            answer = json.loads(row["messages"][-1]["content"])
            assert data.parse_answer(row["messages"][-1]["content"]) == answer


def test_dataset_hash_same_for_split_path_and_rows_and_changes_with_a_row():
    rows = data.load_triage("validation")
    h = data.dataset_hash("validation")
    assert h == data.dataset_hash(rows) == data.dataset_hash(data.split_path("validation"))
    assert h != data.dataset_hash("test")
    changed = json.loads(json.dumps(rows))
    changed[5]["messages"][1]["content"] += "!"
    assert data.dataset_hash(changed) != h
    assert data.dataset_hash(["validation", "test"]) == data.dataset_hash(rows + data.load_triage("test"))


def test_canary_has_text_and_questions_with_expected_words():
    canary = data.load_canary()
    assert len(canary["text"].split()) > 100
    assert len(canary["questions"]) == len(canary["expected"]) >= 5
    assert all(q.endswith("?") for q in canary["questions"])


# --- the hand-written sets -----------------------------------------------------------------------------

def test_handwritten_sets_are_complete_labelled_and_never_in_training():
    generated = {data.normalized(m) for split in ("train", "validation") for m in _messages(split)}
    seen = {}
    minimum = {"handwritten": 150, "handwritten_dev": 60}
    for name in data.HANDWRITTEN:
        rows = data.load_triage(name)
        assert len(rows) >= minimum[name], name
        assert all(r["meta"]["source"] == "handwritten" and r["meta"]["why"] for r in rows)
        ids = [r["meta"]["id"] for r in rows]
        assert len(set(ids)) == len(ids), f"{name}: repeated ids"
        labels = [data.parse_answer(r["messages"][-1]["content"]) for r in rows]
        assert {a["category"] for a in labels} == set(data.CATEGORIES)
        assert {a["priority"] for a in labels} == set(data.PRIORITIES)
        texts = {data.normalized(data.message_of(r)) for r in rows}
        assert len(texts) == len(rows), f"{name}: a message appears twice"
        assert not texts & generated, f"{name}: a hand-written message is in train or validation"
        seen[name] = texts
    names = list(seen)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not seen[a] & seen[b], f"{a} and {b} share a message"


def test_no_handwritten_message_enters_a_training_set():
    from qlora_nb import train

    handwritten = data.load_triage("handwritten")
    for split in ("train", "validation"):
        rows = data.load_triage(split)
        as_trained = [{"messages": p["prompt"] + p["completion"]} for p in train.to_prompt_completion(rows)]
        assert not data.shared_messages(as_trained, handwritten), split
    # the check bites: one hand-written message slipped into training, re-cased and re-punctuated, is found
    leaked = json.loads(json.dumps(handwritten[7]))
    leaked["messages"][1]["content"] = leaked["messages"][1]["content"].upper().replace(",", " ,")
    assert data.shared_messages(data.load_triage("train") + [leaked], handwritten)


def test_a_missing_handwritten_file_says_where_it_comes_from(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_NB_DATA", str(tmp_path))
    with pytest.raises(data.DataError, match="typed, not generated"):
        data.load_triage("handwritten")
