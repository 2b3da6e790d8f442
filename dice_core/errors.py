"""The project's error classes: each message names the file, record, field and what was expected."""


class DiceError(Exception):
    """Base of the errors this project raises on purpose; the CLI prints them as one line."""


class RecipeError(DiceError):
    """A recipe has an unknown key, a wrong type or a value out of range."""


class DataError(DiceError):
    """An input file or record is malformed: missing field, bad JSON, empty set."""


class StoreError(DiceError):
    """The artifact store cannot be reached, written or read as expected."""


class StageError(DiceError):
    """A stage cannot go on with its inputs (for example no prompt keeps enough samples)."""
