"""The base of every error about the user's input: shown as one sentence, never a traceback."""


class UserError(Exception):
    """Bad input (data, model, site, parameters): the message says what is wrong and what to do."""
