"""`python -m reprogrammer.shapeworld OUT.png [RESOLUTION]`: a contact sheet of the shape world
(`reprogrammer.data.shapeworld.sample_sheet`, one row per set), magnified three times."""
import sys

from PIL import Image

from ..data.shapeworld import sample_sheet


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].isdigit()):
        print("usage: python -m reprogrammer.shapeworld OUT.png [RESOLUTION]", file=sys.stderr)
        return 2
    picture = Image.fromarray(sample_sheet(resolution=int(argv[1]) if len(argv) == 2 else 32))
    picture.resize((picture.width * 3, picture.height * 3), Image.NEAREST).save(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
