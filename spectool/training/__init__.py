"""Training drafts: conversation readers (`conversations`), examples into batches (`batches`), regeneration with
the target (`regen`), features, the trainer; the chat format and loss masks are `spectool.chat_format`."""
