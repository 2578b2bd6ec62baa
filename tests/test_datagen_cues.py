"""datagen_cues.py, the first (cue-driven) generator notebook 04 compares against: every priority is its cue sentence."""
from qlora_nb import data, datagen_cues


def test_each_message_carries_its_priority_cue_and_test_cues_stay_apart():
    for split in ("train", "test"):
        rows = datagen_cues.generate_split(split, n=200)
        for row in rows:
            cue = row["meta"]["cue"]
            priority = data.parse_answer(row["messages"][-1]["content"])["priority"]
            assert cue in datagen_cues.CUES[priority][datagen_cues.POOL_OF_SPLIT[split]]
    test_text = " ".join(r["messages"][1]["content"] for r in datagen_cues.generate_split("test", n=200)).lower()
    for pools in datagen_cues.CUES.values():
        for cue in pools["train"]:
            assert cue.lower().replace(".", "") not in test_text, cue


def test_reproducible():
    assert datagen_cues.generate_split("train", n=30) == datagen_cues.generate_split("train", n=30)
