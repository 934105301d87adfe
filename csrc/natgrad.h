// natgrad's C++ API for LibTorch users: every op as a plain C++ function (the same functions
// the dispatcher calls), and the C++ frontend built on them (csrc/api/: the capture layers
// natgrad::nn::Linear / Conv2d / Embedding and the optimizer natgrad::optim::KFAC). Link against
// libnatgrad (CMake target natgrad::natgrad).
#pragma once

#include "empirical/empirical_fisher.h"
#include "empirical/layer_gram.h"
#include "ewc/ewc_penalty.h"
#include "factors/kron_factors.h"
#include "linalg/ladder.h"
#include "linalg/psd_linalg.h"
#include "precondition/kfac_precondition.h"
#include "precondition/kfac_step.h"
#include "common/subnormal.h"
#include "api/layers.h"
#include "api/kfac.h"
#include "api/ewc.h"
