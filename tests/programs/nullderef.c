/*
 * nullderef: dies of a genuine segmentation fault.
 *
 * Usage: nullderef
 *
 * Stores through a NULL pointer.  Under libcow the fault is not one of
 * the handler's, so the process must still die by SIGSEGV, promptly.
 */
#include <stdio.h>

int main(void)
{
    volatile int *p = NULL;

    *p = 42;
    fprintf(stderr, "nullderef: survived a NULL store\n");

    return 0;
}
