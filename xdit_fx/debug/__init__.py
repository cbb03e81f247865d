"""Looking at what the compiler did: graph dumps (text, HTML), their diff, and the model loader of `xdit-fx dump`."""
