"""IR -> IR passes, one class per file, registered by name (see compiler/pass_manager.py)."""
