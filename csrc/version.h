// natgrad's version: the single source of truth, read by setup.py and CMakeLists.txt too.
#pragma once
#define NATGRAD_VERSION "0.3.0"
