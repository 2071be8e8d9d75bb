def set_verbosity_warning():
    pass


def set_verbosity_error():
    pass
