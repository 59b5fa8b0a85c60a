"""``caa serve`` before any engine starts: what it refuses (one line, exit 2) and the server it plans
(no vLLM needed: these run in the main environment)."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest

from caa.cli import app
from caa.errors import CaaError, MismatchError, OptionError
from caa.serve.launch import PLUGINS, ServeOptions, plan_serve
from caa.serve.plugin import ENV, LAYERS, MAX_VECTORS
from tests.helpers import runner

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture
def fake_vllm_python(tmp_path: Path) -> str:
    """An interpreter that claims to have vLLM and caa (the probe only asks it to exit 0)."""
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    return str(script)


def test_a_plan_runs_vllms_own_server_with_caas_plugins(
    tiny: tuple[Path, Path], fake_vllm_python: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, vectors = tiny
    monkeypatch.setenv("VLLM_PLUGINS", "someone_elses")
    options = ServeOptions(
        port=_free_port(),
        api_key="k",
        max_vectors=20,
        steerable_layers=(1,),
        vllm_python=fake_vllm_python,
        vllm_args=("--enforce-eager", "--max-model-len", "64"),
    )
    plan = plan_serve(vectors, str(model), options)
    assert plan.command[:3] == [fake_vllm_python, "-m", "vllm.entrypoints.openai.api_server"]
    assert plan.command[plan.command.index("--model") + 1] == str(model)
    assert plan.command[plan.command.index("--served-model-name") + 1] == "model"
    assert plan.command[plan.command.index("--api-key") + 1] == "k"
    assert plan.command[-3:] == ["--enforce-eager", "--max-model-len", "64"]
    assert plan.env[ENV] == str(vectors.resolve()) and plan.env[MAX_VECTORS] == "20"
    assert plan.env[LAYERS] == "0,1,2,3"  # the file's layers (every one), 1 among them
    assert plan.env["VLLM_PLUGINS"].split(",") == ["someone_elses", *PLUGINS]
    assert plan.behaviors == {"agree": [0, 1, 2, 3], "mood": [0, 1, 2, 3]}
    assert plan.url == f"http://127.0.0.1:{options.port}/v1"
    every = plan_serve(vectors, str(model), ServeOptions(port=options.port, steerable_layers="all",
                                                         vllm_python=fake_vllm_python))  # fmt: skip
    assert every.steerable == [0, 1, 2, 3]
    # the address it is reached at (and probed for readiness at): --host as given, a wildcard as loopback
    for host, shown in (("127.0.0.2", "127.0.0.2"), ("0.0.0.0", "127.0.0.1"), ("::1", "[::1]")):
        there = ServeOptions(host=host, port=_free_port(), vllm_python=fake_vllm_python)
        assert plan_serve(vectors, str(model), there).url == f"http://{shown}:{there.port}/v1"


def test_vectors_of_another_model_are_refused_before_any_engine_starts(
    tiny: tuple[Path, Path], other_vectors: Path, fake_vllm_python: str
) -> None:
    with pytest.raises(MismatchError, match=r"field 'model\.weights_hash' is 'dir:.*another model"):
        plan_serve(other_vectors, str(tiny[0]), ServeOptions(vllm_python=fake_vllm_python))


@pytest.mark.parametrize(
    ("options", "option", "words"),
    [
        ({"max_vectors": 3}, "max_vectors", "is fewer than the 8 vectors of "),
        ({"steerable_layers": (4,)}, "steerable_layers", "out of range; the model has 4 blocks"),
    ],
)
def test_options_that_cannot_work_are_refused(
    tiny: tuple[Path, Path], fake_vllm_python: str, options: dict, option: str, words: str
) -> None:
    with pytest.raises(OptionError) as e:
        plan_serve(tiny[1], str(tiny[0]), ServeOptions(vllm_python=fake_vllm_python, **options))
    assert e.value.option == option and words in e.value.problem


@pytest.mark.parametrize(
    ("options", "option"),
    [({"port": 0}, "port"), ({"max_vectors": 0}, "max_vectors"), ({"api_key": " "}, "api_key"),
     ({"steerable_layers": "most"}, "steerable_layers")],
)  # fmt: skip
def test_options_are_checked_when_made(options: dict, option: str) -> None:
    with pytest.raises(OptionError) as e:
        ServeOptions(**options)
    assert e.value.option == option


def test_the_command_line_refuses_in_one_line_with_exit_code_2(
    tiny: tuple[Path, Path], other_vectors: Path, fake_vllm_python: str
) -> None:
    model, vectors = tiny
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        free = str(_free_port())
        cases = [
            (
                [str(other_vectors), "-m", str(model), "--port", free, "--vllm-python", fake_vllm_python],
                "these vectors were made with another model",
            ),
            (
                [str(vectors), "-m", str(model), "--port", str(port), "--vllm-python", fake_vllm_python],
                f"--port {port}: 127.0.0.1:{port} cannot be used",
            ),
            ([str(vectors), "-m", str(model), "--steerable-layers", "2-9"], "--steerable-layers '2-9'"),
            ([str(vectors.parent / "nope.parquet"), "-m", str(model)], "nope.parquet"),
        ]
        for args, words in cases:
            result = runner.invoke(app, ["serve", *args])
            assert result.exit_code == 2, result.output
            lines = [x for x in result.output.splitlines() if x.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.output


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed in this environment")
def test_without_vllm_the_command_says_how_to_get_it(tiny: tuple[Path, Path]) -> None:
    model, vectors = tiny
    result = runner.invoke(
        app,
        [
            "serve",
            str(vectors),
            "-m",
            str(model),
            "--port",
            str(_free_port()),
            "--vllm-python",
            sys.executable,
        ],
    )
    assert result.exit_code == 2
    assert f"vLLM is not installed for {sys.executable}: `make install-serve`" in result.output
    with pytest.raises(CaaError, match="cannot be run"):
        plan_serve(vectors, str(model), ServeOptions(port=_free_port(), vllm_python="/nonexistent/python"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_server_that_stops_during_start_up_is_told_by_caas_own_line() -> None:
    from caa.serve.launch import _last_words

    log = [
        "(EngineCore pid=1) INFO loading",
        "(Worker pid=2) ERROR 12-07 [x.py:9] Traceback (most recent call last):",
        "(Worker pid=2) ERROR 12-07 [x.py:9] caa.errors.CaaError: caa serve: GPT2 cannot be steered yet",
        "(APIServer pid=3) ERROR RuntimeError: Engine core initialization failed.",
    ]
    assert _last_words(log) == "caa serve: GPT2 cannot be steered yet"
    assert (
        _last_words(log[:1] + log[3:])
        == "(APIServer pid=3) ERROR RuntimeError: Engine core initialization failed."
    )
    assert _last_words(["a", "", "b"]) == "b" and _last_words([]) == "no output"


def test_the_api_serve_runs_the_plan_until_the_server_exits(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """caa.api.serve in one call: planned, started, ``on_ready`` once it answers ``/v1/models`` (with
    the API key), every line passed to ``on_output``, the server's exit code returned. The interpreter
    here answers the vLLM probe and, asked for vLLM's server, runs a one-request HTTP server instead."""
    import caa.api

    standin = tmp_path / "standin.py"
    standin.write_text(
        "import http.server, json, sys\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        ok = self.path == '/v1/models' and self.headers['Authorization'] == 'Bearer k'\n"
        "        self.send_response(200 if ok else 401)\n"
        "        self.end_headers()\n"
        "        self.wfile.write(json.dumps({'data': []}).encode())\n"
        "        print('answered', self.path, flush=True)\n"
        "print('stand-in up on', port, flush=True)\n"
        "server = http.server.HTTPServer(('127.0.0.1', port), H)\n"
        "server.handle_request()\n"
        "sys.exit(3)\n"
    )
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exit 0\nshift 2\nexec {sys.executable} {standin} "$@"\n')
    python.chmod(0o755)
    model, vectors = tiny
    options = ServeOptions(port=_free_port(), api_key="k", vllm_python=str(python))
    ready: list[str] = []
    lines: list[str] = []
    code = caa.api.serve(
        vectors, str(model), options, on_ready=lambda p: ready.append(p.url), on_output=lines.append
    )
    assert code == 3
    assert ready == [f"http://127.0.0.1:{options.port}/v1"]
    assert lines[0] == f"stand-in up on {options.port}"
    assert "answered /v1/models" in lines
