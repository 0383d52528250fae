"""Every error the README's table names is importable from ``producer`` and is a VlmqError."""

import re
from pathlib import Path

import producer

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def readme_error_names() -> list[str]:
    """The first column of the README's error table (the rows after ``| error | when |``)."""
    table = README.split("| error | when |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)


def test_every_error_in_the_readme_is_exported_by_producer():
    names = readme_error_names()
    assert {"TaskExpired", "TaskRevoked", "WrongModel", "InvalidImage"} <= set(names)
    for name in names:
        error = getattr(producer, name)
        assert name in producer.__all__
        assert issubclass(error, producer.VlmqError)
        assert error(f"a {name}").args == (f"a {name}",)
