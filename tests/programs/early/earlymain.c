/*
 * earlymain: the program linked with libearly, whose constructor ran
 * before libcow's (see early.c).
 *
 * Usage: earlymain STEP...
 *
 *   w       write "main" at offset 8 of early_map
 *   n       store through a NULL pointer inside early_guard(), which
 *           must catch it (exit 2 if not)
 *   f       register fork handlers of its own ("C" at 300 in the child),
 *           then fork: the child writes "child" at two pages and exits;
 *           the parent waits for it and writes "parent" at three pages
 *
 * Exit 0 on success, 2 when a check fails, 1 on a system error, 3 when
 * the child failed.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern unsigned char *early_map;
extern size_t early_size;
int early_guard(void (*fn)(void));

static void null_store(void)
{
    *(volatile char *)NULL = 'x';
}

static void main_child(void)
{
    early_map[300] = 'C';
}

static int fork_step(void)
{
    long page = sysconf(_SC_PAGESIZE);
    pid_t pid;
    int status;

    pthread_atfork(NULL, NULL, main_child);
    pid = fork();
    if (pid < 0)
        return 1;
    if (pid == 0) {
        memcpy(early_map + 2 * page, "child", 5);
        exit(0);
    }
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) ||
        WEXITSTATUS(status) != 0)
        return 3;
    memcpy(early_map + 3 * page, "parent", 6);

    return 0;
}

int main(int argc, char **argv)
{
    int i;
    int rc;

    for (i = 1; i < argc; i++) {
        switch (argv[i][0]) {
        case 'w':
            memcpy(early_map + 8, "main", 4);
            break;
        case 'n':
            if (early_guard(null_store) != 1) {
                fprintf(stderr, "earlymain: the fault was not caught\n");
                return 2;
            }
            break;
        case 'f':
            rc = fork_step();
            if (rc != 0)
                return rc;
            break;
        default:
            fprintf(stderr, "earlymain: bad step %s\n", argv[i]);
            return 1;
        }
    }

    return 0;
}
