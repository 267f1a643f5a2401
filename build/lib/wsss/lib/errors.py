"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class WsssError(Exception):
    """Bad input (params, data set, checkpoint, model name): the message names the file/row and the problem."""
