"""The implementation of slmc.api, split by job; import from slmc.api, not from here."""
