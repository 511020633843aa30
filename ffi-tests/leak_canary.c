/* leak_canary.c - leaks on purpose; tests/ffi.rs runs it under valgrind (SB_VALGRIND=1) to
 * prove that the memcheck settings and ffi-tests/valgrind.supp still catch real leaks of
 * library objects: a message nobody unrefs (definitely lost) and a topic whose last
 * reference sits in a global (possibly lost: a handle points inside its block). Not a test
 * of its own. */
#include <stdio.h>
#include "switchboard.h"

sb_topic *kept_topic; /* reachable only through a pointer past the block start: "possibly lost" */

int main(void) {
    sb_message_type *ty = NULL;
    if (sb_message_type_create("canary.type", NULL, &ty) != SB_OK)
        return 2;
    sb_message *m = sb_message_create_bytes(ty, "leak", 5);
    m = NULL; /* definitely lost */
    (void)m;
    kept_topic = sb_topic_create("canary.topic");
    sb_message_type_unref(ty);
    printf("leaked on purpose\n");
    return 0;
}
