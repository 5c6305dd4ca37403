"""User-facing errors: bad input the user can fix. The CLI prints them as one line and exits 2."""


class PyquantError(Exception):
    """A problem with the user's input (file, tensor, key, option), stated in one line."""


class GGUFError(PyquantError):
    """A GGUF file that is malformed or not what pyquant can read; the message names file and offset."""
