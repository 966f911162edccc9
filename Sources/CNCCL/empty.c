// Intentionally empty: the module is header-only (see include/).
