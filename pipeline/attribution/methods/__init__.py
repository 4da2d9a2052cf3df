"""One module per attribution method. Importing this package imports every module in it, and
each registers its method(s) with :func:`pipeline.attribution.base.register`; adding a method is
adding a file here."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
