"""The `pipmm` command line: one verb per pipeline step (train -> export -> build -> run -> measure).

Verbs are registered as "module:prefix"; a verb module provides `add_arguments(parser)`
and `run(args) -> int`. Modules are imported only when their verb is used, so
`pipmm describe` never imports torch even though `pipmm export` does.

Peers (a workstation-side function a device-side verb runs beside itself, e.g. transformers' generate
for `pipmm bench --compare-hf`) are registered the same way, by module string, and resolved here only when
their option is given: the verb gets them as `args.peers` and sdk/ itself never imports export/.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import PipmmError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "describe": ("sdk.cli_describe", "describe an image with a bundle (default: the embedded model)"),
    "export": ("export.cli_export", "export a LLaVA checkpoint (+ prompt MLP) to an ONNX bundle"),
    "scenes": ("export.tasks.sheet", "write generated scenes and LLaVA-style conversations"),
    "train": ("export.train.train", "train the default model on generated scenes (stage 0 base, 1 prompt MLP, 2 budget, "
              "mv several frames)"),
    "eval": ("export.train.evaluate", "exact-match accuracy per question family (--multiview: several frames) and "
             "latency of a bundle or checkpoint"),
    "explain": ("sdk.cli_explain", "heat map of where the model looked for a prompt (T-CLS attention, kept patches)"),
    "bench": ("sdk.bench", "latency per stage and peak memory of a bundle on this device (table, JSON, chart)"),
    "build-engines": ("sdk.cli_build_engines", "build TensorRT engines of a bundle for this GPU (cached by GPU, "
                      "TensorRT version and bundle hash)"),
    "serve": ("sdk.cli_serve", "an OpenAI-compatible server (chat completions with images, /metrics, a web page)"),
    "add-graphs": ("export.cli_add_graphs", "add optional graphs to a bundle (decoder_static: static KV cache for "
                   "CUDA graphs)"),
    "prompt": ("sdk.cli_prompt", "attach a TVP visual prompt to a bundle, detach it, or show it (docs/tvp.md)"),
    "tvp": ("export.tvp.cli", "train a transferable visual prompt (and its image-text guide) on a new camera domain"),
}

# option dest -> (module, function); set on args.peers[dest] when the option is given
PEERS: dict[str, tuple[str, str]] = {
    "compare_hf": ("export.compare_hf", "run_hf"),
}


def resolve_peers(args, peers: dict[str, tuple[str, str]] = PEERS) -> str | None:
    """Fill args.peers with the functions of the options given -> None, or the message when one is not installed."""
    args.peers = {}
    for dest, (module_name, function) in peers.items():
        if getattr(args, dest, None) is None:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            option = "--" + dest.replace("_", "-")
            return f"'pipmm {args.verb} {option}' needs {err.name or module_name}: pip install 'pipmm-edge[export]'"
        args.peers[dest] = getattr(module, function)
    return None


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, `error: pipmm VERB: what is wrong (pipmm VERB --help)`, and exit status 2
    (argparse's own prints the whole usage block first). Subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser(verbs: dict[str, tuple[str, str]] = VERBS) -> tuple[argparse.ArgumentParser, dict]:
    parser = OneLineParser(prog="pipmm", description="PIP-MM multimodal LLMs on edge devices.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    modules = {}
    for verb, (module_name, help_text) in verbs.items():
        sp = sub.add_parser(verb, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            # A verb from the [export] extra on a runtime-only install: say how to get it.
            missing = err.name or module_name
            sp.set_defaults(_missing=f"'pipmm {verb}' needs {missing}: pip install 'pipmm-edge[export]'")
            continue
        module.add_arguments(sp)
        modules[verb] = module
    return parser, modules


def _parser_for(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
    # Import only the module of the verb asked for (startup time, and no torch for describe).
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb in VERBS:
        return build_parser({verb: VERBS[verb]})
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, modules = _parser_for(argv)
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    missing = getattr(args, "_missing", None) or resolve_peers(args)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    try:
        return int(modules[args.verb].run(args) or 0)
    except PipmmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
