"""The package's Jinja2 templates (dermray/templates/): the evaluation report, the saliency gallery and the model
cards. An HTML template is autoescaped: every value it is given is escaped, so a task, class or run name cannot
inject markup. A Markdown template (``*.md.j2``) is not: its values are written as they are, as before. A name the
template uses that it was not given is an error (StrictUndefined), not an empty string. The templates lay the
values out; what is shown and how each number is written is decided in Python, by the caller."""
from __future__ import annotations

import functools

import jinja2


@functools.cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("dermray", "templates"),
        # escaped unless Markdown: an unknown kind of template is treated as HTML
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), disabled_extensions=("md.j2",),
                                            default=True),
        undefined=jinja2.StrictUndefined,
        # a line holding only a {% tag %} leaves nothing in the output (the Markdown templates are line by line)
        trim_blocks=True, lstrip_blocks=True,
        # the output ends as the template does, with its final newline
        keep_trailing_newline=True)


def render(name: str, **values) -> str:
    """The template ``name`` (a file of dermray/templates/) rendered with ``values``."""
    return environment().get_template(name).render(**values)
