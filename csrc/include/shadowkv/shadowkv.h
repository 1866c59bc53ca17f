// Umbrella header: everything a C++ consumer of shadowkv_core needs.
#pragma once

#include "shadowkv/dtypes.h"
#include "shadowkv/paged_kv.h"
#include "shadowkv/shadow_attention.h"
#include "shadowkv/version.h"
#include "shadowkv/workspace.h"
