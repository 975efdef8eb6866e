import shutil
from pathlib import Path

import pytest

from toyjax.config import apply_overrides, load_config_file
from toyjax.data import pipeline
from toyjax.data.text import CorpusError

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


@pytest.mark.parametrize("name", ["moe.py", "phrase_tokens.py", "tinystories.py"])
def test_config_without_the_shared_corpus_names_it_and_the_override(tmp_path, name):
    # A copy three folders deep: its ../shared/corpora (relative to the project the copy pretends to be in) is empty.
    folder = tmp_path / "project" / "experiments" / "configs"
    folder.mkdir(parents=True)
    for file in CONFIGS.glob("*.py"):
        shutil.copy(file, folder)
    cfg = load_config_file(folder / name)
    if not Path(cfg.data.source).is_absolute():  # tinystories.py names the corpus relative to the working directory
        cfg = apply_overrides(cfg, [f"--config.data.source={tmp_path / 'shared' / 'corpora' / 'tinystories_sample.txt'}"])
    with pytest.raises(CorpusError, match=r"tinystories_sample\.txt does not exist.*--config\.data\.source=stories"):
        pipeline.load_documents(cfg.data)
    # The suggested override works: the generated stories load instead.
    stories = apply_overrides(cfg, ["--config.data.source=stories", "--config.data.n_stories=20"])
    assert len(pipeline.load_documents(stories.data)) == 20
