"""Local data sources: a directory of <domain>.<split>.txt|jsonl files (optionally compressed)."""

import gzip
import json

import pytest

from jaxcl.config import ConfigError
from jaxcl.errors import DataError
from jaxcl.data.corpus import load_text
from jaxcl.data.sources import DirectorySource, EmbeddedSource, open_source, split_documents


@pytest.fixture
def text_dir(tmp_path):
    bible = load_text("bible", "valid")
    (tmp_path / "scripture.train.txt").write_text(bible[:20000])
    (tmp_path / "scripture.valid.txt").write_text(bible[20000:30000])
    docs = split_documents(load_text("manpages", "valid"))[:6]
    with gzip.open(tmp_path / "manuals.train.jsonl.gz", "wt") as f:
        for d in docs:
            f.write(json.dumps({"body": d}) + "\n")
    return tmp_path


def test_directory_source_reads_txt_and_compressed_jsonl(text_dir):
    source = open_source(str(text_dir), text_field="body")
    assert isinstance(source, DirectorySource)
    assert source.domains() == ("manuals", "scripture")
    docs = source.documents("manuals", "train")
    assert len(docs) == 6 and docs[0].startswith("NAME")
    assert source.documents("scripture", "train") == split_documents(load_text("bible", "valid")[:20000])


def test_directory_domain_names_may_contain_dots_and_junk_is_ignored(text_dir):
    (text_dir / "wiki.en.train.txt").write_text("Some text.")
    (text_dir / ".scripture.train.txt.swp").write_text("editor swap file")
    (text_dir / "notes.train.md").write_text("not a supported suffix")
    assert open_source(str(text_dir)).domains() == ("manuals", "scripture", "wiki.en")


def test_directory_source_errors_name_the_problem(text_dir):
    source = open_source(str(text_dir), text_field="text")
    with pytest.raises(DataError, match=r"manuals.train.jsonl.gz:1: record has no field 'text'"):
        source.documents("manuals", "train")
    with pytest.raises(ConfigError, match="no file for domain 'manuals' split 'test'"):
        source.documents("manuals", "test")
    with pytest.raises(ConfigError, match="directory not found"):
        open_source(str(text_dir / "missing"))


def test_embedded_source_lists_the_corpus_in_stage_order():
    source = open_source("embedded")
    assert isinstance(source, EmbeddedSource)
    assert source.domains() == ("bible", "jargon", "wordnet", "manpages", "pydoc")
    assert len(source.documents("pydoc", "valid")) > 5


def test_hf_datasets_directory_is_a_source(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets not installed (in the [test] extra)")
    bible, manuals = split_documents(load_text("bible", "valid"))[:4], split_documents(load_text("manpages", "valid"))[:3]
    rows = {"text": bible + manuals, "domain": ["bible"] * 4 + ["manuals"] * 3}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    source = open_source(str(tmp_path / "ds"))
    assert source.domains() == ("bible", "manuals")
    assert source.documents("manuals", "valid") == manuals
    with pytest.raises(ConfigError, match="no split 'test'"):
        source.documents("bible", "test")
