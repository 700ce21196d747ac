"""The error table covers every reason; the layers import without circles and in one direction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from audioclip.errors import InvalidInputError, Reason
from deployments.errors import ITEM_ERRORS, ItemError

ROOT = Path(__file__).resolve().parents[1]


def test_every_reason_has_one_row_with_a_client_status():
    assert set(ITEM_ERRORS) == set(Reason), f"no row for {set(Reason) - set(ITEM_ERRORS)}"
    for reason, status in ITEM_ERRORS.items():
        assert 400 <= status.code < 500, reason
        assert status.type, reason


@pytest.mark.parametrize("reason", list(Reason))
def test_an_item_error_answers_with_its_row(reason):
    error = ItemError(InvalidInputError("why", index=3, reason=reason))
    body = error.response()
    assert body.status_code == ITEM_ERRORS[reason].code
    assert error.body() == {"error": {"type": ITEM_ERRORS[reason].type, "message": "item 3: why", "index": 3}}


def test_triage_answers_a_client_mistake_as_itself_and_ours_as_500(caplog):
    """One triage for HTTP and gRPC: a refusal is logged at INFO, our own fault at ERROR with its
    traceback, and the client is told only that it was internal."""
    import logging

    from deployments.errors import BadRequest
    from deployments.http_api import triaged

    mistake = BadRequest("no such field")
    serve_logger = logging.getLogger("ray.serve")  # Serve's logger does not propagate to caplog's
    serve_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            assert triaged(mistake) is mistake
            ours = triaged(RuntimeError("a bug"))
    finally:
        serve_logger.removeHandler(caplog.handler)
    assert ours.status == 500 and ours.body()["error"]["type"] == "internal_error"
    assert "a bug" not in ours.message
    levels = {r.levelname: r for r in caplog.records}
    assert levels["INFO"].getMessage().startswith("refused: 400 bad_request")
    assert levels["ERROR"].exc_info is not None
    response = ours.response()
    assert response.status_code == 500 and b"internal error; see the server log" in response.body


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports at run time (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith(f"{package}."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package}.")}
    return found


@pytest.mark.parametrize("package", ["audioclip", "deployments"])
def test_no_import_circles(package):
    graph = {p.stem: _imports(p, package) for p in (ROOT / package).glob("*.py")}

    def visit(module: str, path: list[str]) -> None:
        for dep in graph.get(module, ()):
            assert dep not in path, f"import circle: {' -> '.join([*path, dep])}"
            visit(dep, [*path, dep])

    for module in graph:
        visit(module, [module])


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names


def test_the_library_knows_no_serving_and_the_core_no_http():
    for path in (ROOT / "audioclip").glob("*.py"):
        assert not _third_party(path) & {"ray", "deployments", "fastapi", "starlette"}, path.name
    seen, todo = set(), ["core"]
    while todo:  # core and everything it imports from deployments/
        module = todo.pop()
        seen.add(module)
        todo += [m for m in _imports(ROOT / "deployments" / f"{module}.py", "deployments") if m not in seen]
    for module in seen:
        outside = _third_party(ROOT / "deployments" / f"{module}.py")
        assert not outside & {"fastapi", "starlette", "ray"}, (module, outside)
    assert not seen & {"http_api", "http_input", "errors", "router"}, seen
