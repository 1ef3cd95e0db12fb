"""``sam3d-app``: the web app (``blip.app.web``) on a local port; its --help is the page's description."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from blip.app import web
from blip.model import generation_settings
from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser, ConfigError
from ich_engine.distributed import resolve_device
from sam3d.predict.postprocessing import hyperdense_options
from sam3d.predict.scans import add_hyperdense_argument


def main(argv: list[str] | None = None) -> int:
    p = CommandLineParser(description=web.__doc__)
    p.add_argument(
        "--segmentation_checkpoint",
        default=str(web.DEFAULT_SEGMENTATION_CHECKPOINT),
        help="SAM-Med3D checkpoint (default: the one `make demo` writes)",
    )
    p.add_argument(
        "--report_model",
        default=str(web.DEFAULT_REPORT_MODEL),
        help="folder written by `sam3d-report-train` (default: the one `make demo` writes)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto")
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument(
        "--keep_minutes",
        type=float,
        default=web.KEEP_UPLOADS_S / 60,
        help="delete a visitor's uploads and results after this many idle minutes (and when the page closes)",
    )
    p.add_argument("--max_upload_mb", type=int, default=web.MAX_UPLOAD_MB, help="larger uploads are refused")
    add_hyperdense_argument(p)
    args = p.parse_args(argv)
    if args.keep_minutes <= 0 or args.max_upload_mb <= 0:
        p.error("--keep_minutes and --max_upload_mb must be > 0")
    missing = [
        f"{flag} {path}"
        for flag, path in (
            ("--segmentation_checkpoint", args.segmentation_checkpoint),
            ("--report_model", args.report_model),
        )
        if not Path(path).exists()
    ]
    if missing:
        raise ConfigError(
            "missing model(s): " + "; ".join(missing) + ". Run `make demo` first "
            "or pass --segmentation_checkpoint/--report_model."
        )
    logging.basicConfig(level=logging.INFO)
    app = web.build_app(
        args.segmentation_checkpoint,
        args.report_model,
        str(resolve_device(args.device)),
        generation_settings(args),
        args.keep_minutes * 60,
        hyperdense_options(args.hyperdense_only),
    )
    app.launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb}mb")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
