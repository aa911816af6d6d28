"""Training drafts: conversations to token ids and assistant loss masks (`data`), regeneration with the target."""
