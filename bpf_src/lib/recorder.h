/* Observation points of the n-tuple recorder. Without -DRECORDER they cost
 * nothing; the recorder issue fills them in. */
#pragma once
#include "lib/maps.h"

#ifndef RECORDER
#define RECORD_IN(ctx, p) do { } while (0)
#define RECORD_OUT(ctx, verdict, icmp) do { } while (0)
#endif
