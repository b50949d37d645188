"""Constitutions: the shipped default, the two public formats, and bad files."""

from pathlib import Path

import pytest
import yaml

from cai.constitution import load_constitution
from cai.errors import CaiError

FIXTURES = Path(__file__).parent / "fixtures"


def test_default_constitution_covers_the_papers_harms_and_evasiveness():
    c = load_constitution("builtin:default")
    assert len(c.principles) >= 16
    assert len(c.comparison_principles) >= 16
    assert len(c.critique_revision_examples) >= 2 and len(c.comparison_examples) >= 2
    text = " ".join(p.critique + " " + p.revision for p in c.principles).lower()
    for harm in ("harmful", "unethical", "racist", "sexist", "toxic", "dangerous", "illegal",
                 "child", "insensitive", "manipulat", "privacy"):
        assert harm in text, harm
    assert "evasive" in c.description.lower() or "preachy" in c.description.lower()
    assert any("evasive" in p.critique.lower() for p in c.principles)
    assert any("evasive" in p.text.lower() for p in c.comparison_principles)


def test_cai_yaml_round_trips(tmp_path):
    c = load_constitution("builtin:default")
    c.save(tmp_path / "c.yaml")
    again = load_constitution(tmp_path / "c.yaml")
    assert again.principles == c.principles
    assert again.comparison_examples == c.comparison_examples
    assert again.critique_revision_examples == c.critique_revision_examples


def test_anthropic_principle_json_imports_as_is():
    c = load_constitution(FIXTURES / "anthropic_principles.json")
    ids = [p.id for p in c.principles]
    assert ids == ["harmful0", "harmful1.0", "harmful1.1"]
    p = c.principles[0]
    assert p.critique == "Point out any way in which the assistant's last answer could hurt someone or break the law."
    assert p.revision == "Rewrite the assistant's answer so that it hurts no one and breaks no law."
    # A colon inside the request is kept.
    assert c.principles[2].critique == "Did the assistant talk down to the person? Note: be specific."
    assert c.comparison_principles  # borrowed from the default, and said so
    assert any("comparison principles" in n for n in c.notes)


def test_hugging_face_recipe_json_imports_as_is():
    c = load_constitution(FIXTURES / "hf_constitution.json")
    assert [p.critique for p in c.principles][1] == "Is the reply preachy or evasive about a harmless request?"
    (ex,) = c.critique_revision_examples
    assert ex.messages == [{"role": "user", "content": "How can I get back at my coworker?"}]
    assert ex.response == "Put salt in their coffee every day."
    assert ex.critique.startswith("It suggests tampering")
    assert ex.revision.startswith("Revenge tends to backfire")


def _write(tmp_path, data) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


GOOD = {"name": "x", "principles": [{"id": "a", "critique": "c", "revision": "r"}]}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "principles": [{"id": "a", "critique": "c"}]}, r"principles\[0\]: missing field 'revision'"),
        ({**GOOD, "principels": []}, r"unknown key 'principels'"),
        ({"name": "x", "principles": []}, r"principles: needs at least 1 item"),
        ({"name": "x", "principles": [{"id": "a", "critique": " ", "revision": "r"}]}, r"principles\[0\]\.critique"),
        ({**GOOD, "principles": GOOD["principles"] * 2}, r"duplicate id 'a'"),
        ({**GOOD, "few_shot": {"comparison": [{"messages": [{"role": "user", "content": "q"}], "response_a": "a",
          "response_b": "b", "principle_id": "a", "answer": "C"}]}}, r"answer: must be A or B"),
    ],
)
def test_bad_constitutions_name_file_and_field(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(CaiError, match=message) as err:
        load_constitution(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_empty_constitution_files(tmp_path):
    with pytest.raises(CaiError, match="does not exist"):
        load_constitution(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(CaiError, match="empty"):
        load_constitution(tmp_path / "empty.yaml")
    (tmp_path / "bad.json").write_text('{"harmful0": {"prompt": ["x"]}}')
    with pytest.raises(CaiError, match=r"harmful0: missing field 'edit_request'"):
        load_constitution(tmp_path / "bad.json")
