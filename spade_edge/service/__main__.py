"""``python -m spade_edge.service serve|watch``: the same commands as ``spade-edge serve|watch``."""
import click

from .cli import serve, watch


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """spade-edge inspection service and watch-folder mode."""


main.add_command(serve)
main.add_command(watch)

if __name__ == "__main__":
    main(prog_name="python -m spade_edge.service")
