// activation kernel tests (being written)
