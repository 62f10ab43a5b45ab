/* libinstinfer.so is built from instinfer_core (whole archive); this file only gives the shared
   library target a C source of its own. */
#include "instinfer/instinfer.h"
