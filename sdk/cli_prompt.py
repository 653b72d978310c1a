"""`pipmm prompt`: attach a TVP visual prompt to a bundle, detach it, or show one (docs/tvp.md).

    pipmm prompt attach BUNDLE PROMPT_DIR [--out NEW_BUNDLE] [--overwrite]
    pipmm prompt detach BUNDLE [--out NEW_BUNDLE] [--overwrite]
    pipmm prompt show BUNDLE_OR_PROMPT_DIR

Without --out the bundle is changed in place (the prompt file first, then the manifest, atomically); with it a
new bundle is written through the staged writer, its graphs hard-linked from the original where possible.
"""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    attach = sub.add_parser("attach", help="add a prompt to a bundle of the same input size")
    attach.add_argument("bundle", help="bundle directory")
    attach.add_argument("prompt", help="prompt directory written by 'pipmm tvp train'")
    detach = sub.add_parser("detach", help="remove a bundle's prompt")
    detach.add_argument("bundle", help="bundle directory")
    for p in (attach, detach):
        p.add_argument("--out", default=None, metavar="DIR", help="write a new bundle here instead of changing BUNDLE")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an attached prompt (attach) or an existing --out directory")
    show = sub.add_parser("show", help="print a bundle's or a prompt directory's prompt settings as JSON")
    show.add_argument("path", help="bundle or prompt directory")


def run(args) -> int:
    from pathlib import Path

    from .bundle import read_manifest
    from .manifest import MANIFEST_FILE
    from .visual_prompt import VisualPrompt, VisualPromptError, attach, detach

    if args.action == "attach":
        path = attach(args.bundle, args.prompt, args.out, args.overwrite)
        print(f"attached {args.prompt} to {path}")
    elif args.action == "detach":
        print(f"detached the visual prompt of {detach(args.bundle, args.out, args.overwrite)}")
    elif (Path(args.path) / MANIFEST_FILE).is_file():
        section = read_manifest(Path(args.path)).visual_prompt
        if section is None:
            raise VisualPromptError(f"bundle {args.path} carries no visual prompt")
        print(json.dumps(section.to_dict(), indent=1))
    else:
        prompt = VisualPrompt.load(args.path)
        print(json.dumps({**prompt.section().to_dict(), "settings": prompt.settings}, indent=1))
    return 0
