"""``divekit stylize``: one library call (:func:`divekit.tasks.stylize.stylize`); this module
only parses and prints."""

from __future__ import annotations

import argparse

from divekit.cli._common import add_command
from divekit.config import add_config_options, typed_options

COMMANDS = ("stylize",)

EXAMPLES = """\
examples:
  divekit stylize astronaut chelsea -o astronaut-cat.png          embedded photos, 500 steps
  divekit stylize photo.jpg painting.jpg -o out.png --weights vgg19-dcbb9e9d.pth
  divekit stylize coffee rocket -o out.png --steps 200 --size 200x300 --save-every 50
  divekit stylize photo.jpg style.jpg -o out.png --style-weight 1e4 --style-layers 0,5,10

CONTENT and STYLE are image files, or the names of scikit-image's bundled photos
(astronaut, coffee, chelsea, rocket, cat, camera, immunohistochemistry, retina,
hubble_deep_field, coins, moon), so the command runs with no files at all.
Besides -o it writes OUT.losses.png (content, style, TV and total loss per step) and
OUT.panel.png (content, style and result side by side, titled with the weights used).
Without --weights, torchvision's cached vgg19-dcbb9e9d.pth is used when present; otherwise the
network has random weights (a warning says so): the losses still fall, but the picture only
shows texture statistics of a random network.
"""


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.tasks.stylize import StylizeOptions

    p = add_command(
        sub, parent, "stylize", help="neural style transfer (VGG-19 features)",
        description="Synthesise an image with CONTENT's layout and STYLE's textures: the image "
        "is the parameter, optimised by Adam against a frozen VGG-19's content loss (layer 25), "
        "style loss (Gram matrices at layers 0, 5, 10, 19, 28) and total variation.",
        examples=EXAMPLES)
    p.add_argument("content", help="content image file, or an embedded photo name (astronaut, ...)")
    p.add_argument("style", help="style image file, or an embedded photo name (chelsea, ...)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.png",
                   help="the result image (also OUT.losses.png, OUT.panel.png); never CONTENT or "
                   "STYLE, and an existing file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace existing output files")
    add_config_options(p, StylizeOptions)
    p.set_defaults(handler=cmd_stylize)


def cmd_stylize(args: argparse.Namespace) -> None:
    from divekit.tasks.stylize import stylize

    options = typed_options(args, drop=("content", "style", "out"))
    result = stylize(args.content, args.style, out=args.out, progress=True, **options)
    h = result.history
    print(f"{args.out}: {len(h['total'])} steps, {result.seconds_per_step:.3f} s/step, "
          f"total loss {h['total'][0]:.4g} -> {h['total'][-1]:.4g} "
          f"(content {h['content'][-1]:.4g}, style {h['style'][-1]:.4g}, tv {h['tv'][-1]:.4g}); "
          f"{result.weights}")
    for name, path in result.files.items():
        if name != "image":
            print(f"{name}: {path}")

