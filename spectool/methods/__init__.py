"""The draft methods, one module each: what a method is (`base.DraftMethod`) and the four spectool ships.

`spectool.registry` collects them; see ARCHITECTURE.md, "Adding a method".
"""
