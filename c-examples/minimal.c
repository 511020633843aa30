/* minimal.c - create a type and a topic, subscribe, publish, unsubscribe. */
#include <stdio.h>
#include <stdlib.h>
#include <switchboard.h>

static void on_message(void *data, sb_subscription *sub, sb_message *msg)
{
	int *received = data;
	(void)sub;
	if (sb_message_get_type(msg) == sb_subscription_change_type())
		return; /* "Subscribe" / "Unsubscribe" notifications */
	printf("received: %s\n", (const char *)sb_message_data(msg));
	++*received;
}

int main(void)
{
	sb_message_type *type = NULL;
	int received = 0;

	if (sb_message_type_create("greeting", NULL, &type) != SB_OK) {
		fprintf(stderr, "sb_message_type_create: %s\n", sb_last_error());
		return 1;
	}
	sb_topic *topic = sb_topic_create("greetings");
	sb_subscription *sub = topic ? sb_subscribe(topic, on_message, &received) : NULL;
	if (!sub) {
		fprintf(stderr, "setup failed: %s\n", sb_last_error());
		return 1;
	}
	for (int i = 1; i <= 3; i++) {
		char *text = malloc(32);
		if (!text)
			return 1;
		snprintf(text, 32, "hello #%d", i);
		sb_message *msg = sb_message_create(type, text, free);
		if (!msg) {
			free(text); /* creation failed: we still own it */
			return 1;
		}
		sb_publish(topic, msg); /* does not take our reference */
		sb_message_unref(msg);
	}
	sub = sb_unsubscribe_and_join(sub); /* every message above has been handled */
	sb_topic_unref(topic);
	sb_message_type_unref(type);
	return received == 3 ? 0 : 1;
}
