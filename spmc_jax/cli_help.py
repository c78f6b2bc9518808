"""The `--help` layout shared by the command-line tools: each flag's sentence, then its default
exactly once.

argparse's `ArgumentDefaultsHelpFormatter` appends "(default: None)" to flags whose default is
spelled out in their sentence ("default: all"), and "(default: False)" to on/off switches. This
formatter appends "(default: X)" only when the sentence has no "(default: ...)" of its own, shows
on/off switches as "(default: off)", and leaves a None default to the sentence.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Wrapped description; every flag's default shown once."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "(default: " in text
            or action.default is argparse.SUPPRESS
            or not action.option_strings
            or isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"
