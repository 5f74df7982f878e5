"""Errors a user can act on. The CLI prints them as one line and exits with code 2 (no traceback)."""


class UserError(Exception):
    """Bad configuration or input: the message names the file, key, column or row and what is wrong."""


class SchemaError(UserError):
    """A table does not have the columns or types its schema requires."""


class TaxonomyError(UserError):
    """The disease taxonomy is not a single well-formed tree."""


class ConfigError(UserError):
    """A run config key is unknown, mistyped or missing."""
